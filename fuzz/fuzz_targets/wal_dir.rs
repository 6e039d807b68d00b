//! Recovery of a data directory whose files hold arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile_fuzz::wal_dir(data));
