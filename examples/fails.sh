#!/bin/bash
#KBATCH --job-name=will-fail
echo "about to fail"
ls /no/such/file
