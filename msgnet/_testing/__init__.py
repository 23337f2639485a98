"""Test helpers shipped with msgnet: a seeded impairment relay for real-socket tests."""
