//! The wire: a byte stream as a server (requests) or a client (replies) reads it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile_fuzz::frame(data));
