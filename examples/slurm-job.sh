#!/bin/bash
# An unchanged Slurm script: kbatch reads its #SBATCH lines.
#SBATCH --job-name=estimate-pi
#SBATCH --partition=standard
#SBATCH --time=00:05:00
#SBATCH --mem=256M
#SBATCH --cpus-per-task=1
#SBATCH --output=%x-%j.out

echo "job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $(hostname) with $SLURM_CPUS_PER_TASK CPU"
python3 - <<'PY'
import random
n = 200_000
inside = sum(random.random() ** 2 + random.random() ** 2 <= 1 for _ in range(n))
print(f"pi is about {4 * inside / n:.3f}")
PY
