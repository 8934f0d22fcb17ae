"""The adversarial tier (marker `adversarial`, part of `make test`): what an attacker or a careless user can send,
and what must never happen (a token or a Label Studio cookie leaving for another host, a 500, a stuck server)."""
