"""Test, benchmark and demo support that ships with the package (real servers on 127.0.0.1)."""
