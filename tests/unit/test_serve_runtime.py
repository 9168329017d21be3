"""serve/runtime.py: the Serve mode the launchers start Ray with; a user's own setting wins."""

from serve.runtime import SERVE_ENV, apply_serve_env


def test_fills_in_what_is_missing_and_keeps_what_the_user_set():
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "OTHER": "x"}
    in_effect = apply_serve_env(env)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert in_effect == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    assert env["OTHER"] == "x" and set(in_effect) == set(SERVE_ENV)


def test_an_empty_environment_gets_the_whole_serve_env():
    env: dict[str, str] = {}
    assert apply_serve_env(env) == SERVE_ENV == env
