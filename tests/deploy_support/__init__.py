"""Test support for the deployment tests: a throw-away sshd, stand-in devices, small bundles."""
