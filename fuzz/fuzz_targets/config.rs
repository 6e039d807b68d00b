//! `turnstile serve --config FILE`: the TOML settings file.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile_fuzz::config(data));
