//! Integration tests for Outflow against real servers. The tests live in
//! `tests/`, one file per behaviour; run them with `scripts/test.sh`.
