//! The log reader and recovery, past the checksums: record bodies framed as the writer does.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile_fuzz::wal_records(data));
