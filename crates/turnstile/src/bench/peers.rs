//! The peers measured beside the coordinator: a bare TCP echo, Redis's lock (`SET NX PX` +
//! `DEL`), and etcd's own Lock RPC.

use super::*;

/// The peer: a loopback echo server on its own thread and `clients` connections doing
/// 16-byte ping-pongs.
pub(super) async fn echo(args: &BenchArgs, start: Start) -> anyhow::Result<Outcome> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let Ok(rt) = rt else { return };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = [0u8; 16];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    let errors = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    let window = start.window();
    let mut tasks = tokio::task::JoinSet::new();
    for s in streams {
        let errors = errors.clone();
        tasks.spawn(async move {
            let (_, n, lat) = window
                .drive(s, &errors, |mut s| async move {
                    let mut buf = [7u8; 16];
                    let ok =
                        s.write_all(&buf).await.is_ok() && s.read_exact(&mut buf).await.is_ok();
                    (s, ok.then_some(true))
                })
                .await;
            (n, lat)
        });
    }
    collect(tasks, args.duration).await
}

/// The Redis peer: each client loops `SET bench-r-I 1 NX PX 10000` (the lock), then `DEL`
/// (the unlock), over its own connection, timing the pair as the coordinator scenarios do.
pub(super) async fn redis(args: &BenchArgs, start: Start) -> anyhow::Result<Outcome> {
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let s = tokio::net::TcpStream::connect(&args.redis)
            .await
            .with_context(|| format!("connecting to Redis at {}", args.redis))?;
        s.set_nodelay(true)?;
        let key = format!("bench-r-{i}");
        let lock = resp(&["SET", &key, "1", "NX", "PX", "10000"]);
        let unlock = resp(&["DEL", &key]);
        conns.push((s, lock, unlock));
    }
    let window = start.window();
    let mut tasks = tokio::task::JoinSet::new();
    for (s, lock, unlock) in conns {
        let errors = errors.clone();
        tasks.spawn(async move {
            let client = (s, Vec::with_capacity(64), lock, unlock);
            let (_, n, lat) = window
                .drive(client, &errors, |mut c| async move {
                    let (s, buf, lock, unlock) = &mut c;
                    let outcome = match call(s, lock, buf).await {
                        Ok(locked) => match call(s, unlock, buf).await {
                            Ok(unlocked) => Some(locked == b"+OK" && unlocked == b":1"),
                            Err(_) => None,
                        },
                        Err(_) => None,
                    };
                    (c, outcome)
                })
                .await;
            (n, lat)
        });
    }
    let mut outcome = collect(tasks, args.duration).await?;
    outcome.errors = errors.load(Ordering::Relaxed);
    Ok(outcome)
}

/// The etcd peer: each client grants a lease, then loops lock/unlock of its own name with the
/// v3 Lock RPC over its own gRPC connection (the etcd backend's client), timing the pair as
/// the other scenarios do.
pub(super) async fn etcd_lock(args: &BenchArgs, start: Start) -> anyhow::Result<Outcome> {
    use serde_json::json;
    use turnstile_client::etcd_rpc::Channel;
    let url = args
        .url
        .as_deref()
        .and_then(|u| u.strip_prefix("etcd://"))
        .context("--scenario etcd-lock needs --url etcd://HOST:PORT")?;
    let addr = url.split(['/', ',']).next().unwrap_or(url).to_owned();
    let errors = Arc::new(AtomicU64::new(0));
    let mut locks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let channel = Channel::connect(&addr)
            .await
            .with_context(|| format!("connecting to etcd at {addr}"))?;
        let granted = channel
            .call("/v3/lease/grant", &json!({"TTL": "30"}))
            .await
            .with_context(|| format!("granting a lease on etcd at {addr}"))?;
        let lease = granted["ID"].as_str().unwrap_or("0").to_owned();
        let lock = json!({"name": ascii_base64(&format!("bench-l-{i}")), "lease": lease});
        locks.push((lease, lock, channel));
    }
    let window = start.window();
    let mut tasks = tokio::task::JoinSet::new();
    for (lease, lock, channel) in locks {
        let errors = errors.clone();
        tasks.spawn(async move {
            let (channel, n, lat) = window
                .drive(channel, &errors, |channel| {
                    let lock = lock.clone();
                    async move {
                        let ok = match channel.call("/v3/lock/lock", &lock).await {
                            Ok(v) => match v.get("key") {
                                Some(key) => channel
                                    .call("/v3/lock/unlock", &json!({ "key": key }))
                                    .await
                                    .is_ok(),
                                None => false,
                            },
                            Err(_) => false,
                        };
                        (channel, Some(ok))
                    }
                })
                .await;
            let _ = channel
                .call("/v3/lease/revoke", &json!({ "ID": lease }))
                .await;
            (n, lat)
        });
    }
    let mut outcome = collect(tasks, args.duration).await?;
    outcome.errors = errors.load(Ordering::Relaxed);
    Ok(outcome)
}

/// Standard base64 of an ASCII name, as the JSON mapping of etcd's messages takes `bytes`.
pub(super) fn ascii_base64(text: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in text.as_bytes().chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= c.len() {
                ABC[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// A command in the Redis protocol (RESP): an array of bulk strings.
pub(super) fn resp(words: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for w in words {
        out.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
    }
    out
}

/// Sends a command and reads its one-line reply (`+OK`, `:1`, `$-1`...), without the CRLF.
pub(super) async fn call(
    s: &mut tokio::net::TcpStream,
    command: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    s.write_all(command).await?;
    buf.clear();
    loop {
        let mut chunk = [0u8; 64];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.ends_with(b"\r\n") {
            buf.truncate(buf.len() - 2);
            return Ok(buf.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            resp(&["DEL", "k1"]),
            b"*2\r\n$3\r\nDEL\r\n$2\r\nk1\r\n".to_vec()
        );
    }
}
