"""acme-keepfirst against tokenpress's method contract (every check, every tiny model family)."""

from tokenpress.testing import MethodContract


class TestAcmeKeepFirst(MethodContract):
    method = "acme-keepfirst"
    params = {"keep_ratio": 0.5}
