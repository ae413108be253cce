"""loadproof's cluster security rules as a Pulumi policy pack (``pulumi preview --policy-pack policy/``).

The rules are in :mod:`policy.rules`; ``__main__.py`` is the pack's entry point. See docs/policy.md.
"""
