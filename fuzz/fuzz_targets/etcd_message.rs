//! The etcd backend's protobuf codec (`etcd/pb.rs`): every message it knows, decoded from
//! the same bytes; what decodes must encode and decode again to the same JSON.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile_client::fuzzing::etcd_messages(data));
