"""The fault doubles the tests use (they live in the package, shared with bench/), and the
ACL the suite's own redis-servers load: the shipped contrib/redis/callguard.acl."""

from pathlib import Path

from callguard.simulator.faults import Proxy, RedisServer, answers, bindable, free_port

__all__ = ["Proxy", "RedisServer", "answers", "bindable", "free_port", "ACL_USER", "ADMIN",
           "acl_file", "admin_url"]

SHIPPED_ACL = Path(__file__).parents[1] / "contrib" / "redis" / "callguard.acl"
ACL_USER = "callguard:acl-test-password"  # user:password in the URLs the tests use
ADMIN = "cg-admin:admin-test-password"  # for what only tests do (SCAN, SCRIPT FLUSH)


def acl_file(path: Path) -> Path:
    """The shipped ACL with the tests' key prefixes (t<hex>, see conftest) for "cg", a
    password for `callguard`, an admin user for the tests' own needs, and no default
    user: a connection without the callguard user's password can do nothing."""
    rules = SHIPPED_ACL.read_text().strip()
    for shipped, ours in (("~cg:*", "~t*"), ("&cg:*", "&t*"),
                          ("resetpass", f"resetpass >{ACL_USER.split(':')[1]}")):
        assert rules.count(shipped) == 1, f"{SHIPPED_ACL} has no {shipped} to rewrite"
        rules = rules.replace(shipped, ours)
    admin, password = ADMIN.split(":")
    path.write_text(f"user default off\n{rules}\n"
                    f"user {admin} on >{password} ~* &* +@all\n")
    return path


def admin_url(url: str) -> str:
    """`url` with every right: the admin user's where it names the callguard user."""
    return url.replace(f"//{ACL_USER}@", f"//{ADMIN}@")
