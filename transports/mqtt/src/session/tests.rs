//! Session tests on simulated time.
