"""Model specs for the fuzzer and the builder that turns them into modules."""
