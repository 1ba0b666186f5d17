"""Configuration comes from the environment alone; a bad value stops start-up, named."""

import pytest

from service.config import ConfigError, Settings, from_env

GOOD = {
    "DATABASE_URL": "postgresql://root@127.0.0.1:5432/postgres",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "JWT_SECRET": "a-secret-long-enough-for-hs256-signing!",
}


def test_complete_environment_gives_settings_with_documented_defaults():
    s = from_env(GOOD)
    assert isinstance(s, Settings)
    assert s.database_url == GOOD["DATABASE_URL"]
    assert s.port == 8000
    assert s.rate_limit_per_minute == 60
    assert s.channel_prefix == "gestures:"


@pytest.mark.parametrize("name", ["DATABASE_URL", "REDIS_URL", "JWT_SECRET"])
@pytest.mark.parametrize("value", [None, ""])
def test_missing_required_variable_is_refused_by_name(name, value):
    env = dict(GOOD)
    if value is None:
        del env[name]
    else:
        env[name] = value
    with pytest.raises(ConfigError, match=name):
        from_env(env)


@pytest.mark.parametrize("port", ["eighty", "80.5", "-1", "0"])
def test_bad_port_is_refused_by_name(port):
    with pytest.raises(ConfigError, match="PORT"):
        from_env({**GOOD, "PORT": port})


def test_port_is_read():
    assert from_env({**GOOD, "PORT": "9123"}).port == 9123


def test_non_numeric_tuning_variable_is_refused_by_name():
    with pytest.raises(ConfigError, match="RATE_LIMIT_PER_MINUTE"):
        from_env({**GOOD, "RATE_LIMIT_PER_MINUTE": "lots"})
    with pytest.raises(ConfigError, match="DB_TIMEOUT"):
        from_env({**GOOD, "DB_TIMEOUT": "soon"})


def test_compression_is_off_unless_turned_on_and_a_bad_flag_is_refused_by_name():
    assert from_env(GOOD).ws_per_message_deflate is False
    assert from_env({**GOOD, "WS_PER_MESSAGE_DEFLATE": "true"}).ws_per_message_deflate is True
    with pytest.raises(ConfigError, match="WS_PER_MESSAGE_DEFLATE"):
        from_env({**GOOD, "WS_PER_MESSAGE_DEFLATE": "maybe"})


def test_keepalive_pings_every_30_s_by_default_and_0_turns_them_off():
    s = from_env(GOOD)
    assert (s.ws_ping_interval, s.ws_ping_timeout) == (30.0, 20.0)
    assert from_env({**GOOD, "WS_PING_INTERVAL": "0"}).ws_ping_interval == 0
    with pytest.raises(ConfigError, match="WS_PING_TIMEOUT"):
        from_env({**GOOD, "WS_PING_TIMEOUT": "0"})


def test_cluster_mode_is_off_by_default_and_read_as_a_boolean():
    assert from_env(GOOD).redis_cluster is False
    for raw, value in [("true", True), ("TRUE", True), ("1", True), ("false", False), ("0", False)]:
        assert from_env({**GOOD, "REDIS_CLUSTER": raw}).redis_cluster is value
    with pytest.raises(ConfigError, match="REDIS_CLUSTER must be true or false"):
        from_env({**GOOD, "REDIS_CLUSTER": "sometimes"})


@pytest.mark.parametrize("presence", ["gestures:", "g", ""])
def test_an_event_channel_prefix_under_the_presence_prefix_is_refused(presence):
    """Channels under PRESENCE_PREFIX are read as presence: events there would be dropped."""
    env = {**GOOD, "CHANNEL_PREFIX": "gestures:", "PRESENCE_PREFIX": presence}
    if presence == "":  # unset: the default, which is fine
        assert from_env(env).presence_prefix == "gesture-presence:"
        return
    with pytest.raises(ConfigError, match="CHANNEL_PREFIX"):
        from_env(env)


def test_a_presence_prefix_under_the_event_prefix_is_accepted():
    env = {**GOOD, "CHANNEL_PREFIX": "g:", "PRESENCE_PREFIX": "g:presence:"}
    assert from_env(env).presence_prefix == "g:presence:"


def test_sends_linger_4_ms_by_default_0_turns_it_off_and_seconds_of_it_are_refused():
    assert from_env(GOOD).send_linger == 0.004
    assert from_env({**GOOD, "SEND_LINGER": "0"}).send_linger == 0
    with pytest.raises(ConfigError, match=r"SEND_LINGER must be at most 0\.1"):
        from_env({**GOOD, "SEND_LINGER": "4"})  # meant as milliseconds
