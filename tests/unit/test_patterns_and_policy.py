from pathlib import Path

import pytest

from kbatch.errors import SpecError
from kbatch.models import JobSpec
from kbatch.patterns import expand_pattern, resolve_output
from kbatch.server.policy import Policy, check


def test_patterns() -> None:
    assert (
        expand_pattern("%x-%j.%u.out", job_id="42", name="train", user="ana") == "train-42.ana.out"
    )
    assert expand_pattern("%5j_%A_%a%%", job_id="42", name="n", user="u") == "00042_42_0%"
    assert (
        resolve_output(None, workdir="/home/u", job_id="7", name="n", user="u")
        == "/home/u/kbatch-7.out"
    )
    assert resolve_output("/abs/%j", workdir="/home/u", job_id="7", name="n", user="u") == "/abs/7"
    with pytest.raises(SpecError, match="%q is not known"):
        expand_pattern("%q", job_id="1", name="n", user="u")


SCRIPT = "#!/bin/sh\n"


def test_policy_limits_name_the_rule() -> None:
    policy = Policy(
        max_cpus=2, max_memory=1024, max_gpus=0, max_time=60, allowed_images=("quay.io/jupyter/*",)
    )
    for spec, rule in [
        (JobSpec(script=SCRIPT, cpus=3), "max_cpus"),
        (JobSpec(script=SCRIPT, memory=2048), "max_memory"),
        (JobSpec(script=SCRIPT, gpus=1), "max_gpus"),
        (JobSpec(script=SCRIPT, time_limit=61), "max_time"),
        (JobSpec(script=SCRIPT, image="docker.io/evil"), "allowed_images"),
    ]:
        with pytest.raises(SpecError, match=rule):
            check(spec, policy)
    ok = check(JobSpec(script=SCRIPT, image="quay.io/jupyter/scipy-notebook"), policy)
    assert ok.time_limit == 60  # the maximum applies when no limit is given


def test_policy_strips_credentials() -> None:
    spec = check(
        JobSpec(script=SCRIPT, environment={"JUPYTERHUB_API_TOKEN": "t", "A": "1"}), Policy()
    )
    assert spec.environment == {"A": "1"}


def test_policy_environment_size() -> None:
    with pytest.raises(SpecError, match="max_env_bytes"):
        check(JobSpec(script=SCRIPT, environment={"A": "x" * 300_000}), Policy())


def test_per_user_limits_are_read_from_the_policy_section(tmp_path: Path) -> None:
    from kbatch.backends.userlimits import UserLimits
    from kbatch.errors import ConfigError
    from kbatch.server.config import load_config

    path = tmp_path / "kbatch.toml"
    path.write_text(
        "[policy]\nmax_running_jobs_per_user = 2\nmax_submitted_jobs_per_user = 50\n"
        'max_cpus_per_user = 4\nmax_memory_per_user = "8G"\nmax_gpus_per_user = 1\n'
    )
    config = load_config(path, environ={"HOME": str(tmp_path)})
    assert config.policy.user_limits() == UserLimits(2, 50, 4, 8 * 1024**3, 1)
    # Kubernetes enforces them too; a backend that does not is refused, never ignored.
    load_config(path, environ={"HOME": str(tmp_path)}, backend="kubernetes")
    with pytest.raises(ConfigError, match="not by 'fake'"):
        load_config(path, environ={"HOME": str(tmp_path)}, backend="fake")
