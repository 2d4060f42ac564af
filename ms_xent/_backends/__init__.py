"""Private implementations of ms_xent's ops; the public API is :mod:`ms_xent.ops` / :mod:`ms_xent.nn`."""
