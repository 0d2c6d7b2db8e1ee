"""Markers of the property modules (the plugin selects by them)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "partywall_replay: the replay runner; runs only with --partywall-replay")
    config.addinivalue_line("markers", "partywall_bench: the 100-user benchmark; runs under the bench profile")
