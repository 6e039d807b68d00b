//! The shared directory's record parsers (`file://` backend).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile_client::fuzzing::file_parsers(data));
