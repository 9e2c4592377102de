"""The public API is pinned: a change here is a change users see."""

import kbatch.client
import kbatch.errors
import kbatch.models


def test_exports() -> None:
    assert sorted(kbatch.client.__all__) == ["Client", "ClientConfig", "discover_config"]
    assert sorted(kbatch.errors.__all__) == [
        "ApiError",
        "AuthenticationError",
        "ConfigError",
        "Conflict",
        "InvalidRequest",
        "KbatchError",
        "NotFound",
        "PermissionDenied",
        "ServiceUnavailable",
        "SpecError",
        "TransportError",
        "WaitTimeout",
        "api_error_for_status",
    ]
    assert sorted(kbatch.models.__all__) == [
        "ACTIVE_STATES",
        "API_PREFIX",
        "ErrorBody",
        "ErrorDetail",
        "Identity",
        "Job",
        "JobEvent",
        "JobList",
        "JobSpec",
        "JobState",
        "SubmitRequest",
        "SweepParams",
        "TERMINAL_STATES",
        "UpdateRequest",
    ]


def test_error_tree() -> None:
    from kbatch.errors import (
        ApiError,
        KbatchError,
        NotFound,
        PermissionDenied,
        api_error_for_status,
    )

    assert issubclass(NotFound, ApiError) and issubclass(ApiError, KbatchError)
    from kbatch.errors import WaitTimeout

    # One except clause catches everything kbatch raises; `except TimeoutError` still works.
    assert issubclass(WaitTimeout, KbatchError) and issubclass(WaitTimeout, TimeoutError)
    assert api_error_for_status(403) is PermissionDenied
    assert api_error_for_status(418) is ApiError


def test_states_are_slurms() -> None:
    assert [s.value for s in kbatch.models.JobState] == [
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
    ]


def test_client_config_never_shows_the_token() -> None:
    config = kbatch.client.ClientConfig(url="http://x", token="s3cret", source="test")
    assert "s3cret" not in repr(config)
