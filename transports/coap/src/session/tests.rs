//! Tests of the session on simulated time.
