//! The fan-out's floors: the least a server on this host can do to answer parked requests, on one core (or,
//! with `KILN_BENCH_SHARED=1`, on every core: as many threads as CPUs, as kilnd then has workers). Each holds
//! every connection's request (read to the blank line, no HTTP library) until `GET /publish`, then writes each
//! one the same playlist-sized answer, as kilnd does for a blocking reload, and measures publish → each answer
//! written, like `kiln_origin_fanout_seconds`. [`main`] is a bare tokio program with a task per connection, as
//! kilnd has; [`main_loop`] has no runtime: one loop writes every answer. The bench runs them as its own process
//! (this binary, `KILN_BENCH_FLOOR=<body length>`, and `KILN_BENCH_FLOOR_LOOP=1` for the loop), pinned to the
//! server's CPU.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Shared between the connections.
struct Floor {
    parked: AtomicUsize,
    /// Set by `/publish`: when it came.
    published: watch::Sender<Option<Instant>>,
    /// Publish → answer written, per woken request.
    written: std::sync::Mutex<Vec<Duration>>,
    answer: Vec<u8>,
}

/// Runs the floor server on 127.0.0.1:0 with `threads` async workers (one: a current-thread runtime) and prints
/// `listening on http://ADDR` (then serves until killed).
pub fn main(body_len: usize, threads: usize) -> ! {
    let rt = if threads > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("floor listening on http://{}", listener.local_addr().expect("addr"));
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.apple.mpegurl\r\ncache-control: public, max-age=12\r\n\
             content-length: {body_len}\r\n\r\n"
        )
        .into_bytes();
        answer.resize(answer.len() + body_len, b'#');
        let floor = Arc::new(Floor {
            parked: AtomicUsize::new(0),
            published: watch::channel(None).0,
            written: std::sync::Mutex::new(Vec::new()),
            answer,
        });
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            let _ = tcp.set_nodelay(true);
            tokio::spawn(connection(tcp, floor.clone()));
        }
    })
}

/// Reads one request head; `None` at the end of the connection.
async fn request(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    Some(line.split(' ').nth(1).unwrap_or("").to_string())
}

async fn connection(mut tcp: TcpStream, floor: Arc<Floor>) {
    while let Some(path) = request(&mut tcp).await {
        let text = |s: String| format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{s}", s.len());
        let out = match path.as_str() {
            "/parked" => text(floor.parked.load(Ordering::SeqCst).to_string()).into_bytes(),
            "/publish" => {
                floor.published.send_replace(Some(Instant::now()));
                text("published".into()).into_bytes()
            }
            "/written" => {
                let mut w = floor.written.lock().expect("lock").clone();
                w.sort();
                let q = |q: f64| {
                    w.get(((w.len().max(1) - 1) as f64 * q) as usize)
                        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
                };
                text(format!(
                    "{} {:.1} {:.1} {:.1}",
                    w.len(),
                    q(0.5),
                    q(0.99),
                    q(1.0)
                ))
                .into_bytes()
            }
            _ => {
                let mut rx = floor.published.subscribe();
                floor.parked.fetch_add(1, Ordering::SeqCst);
                let at = match rx.wait_for(Option::is_some).await {
                    Ok(at) => at.expect("set"),
                    Err(_) => return,
                };
                floor.parked.fetch_sub(1, Ordering::SeqCst);
                if tcp.write_all(&floor.answer).await.is_err() {
                    return;
                }
                floor.written.lock().expect("lock").push(at.elapsed());
                continue;
            }
        };
        if tcp.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The floor below that one: no async runtime and no task per request. Accepted connections are read on one
/// thread and kept in a list; `GET /publish` writes the same answer to every parked one in a loop, the list
/// split between `threads` threads. This is what a server that writes its waiters' answers itself when a part
/// is published (instead of waking one task per request) could come down to: the kernel's writes and nothing
/// else. `KILN_BENCH_FLOOR_LOOP=1` selects it.
pub fn main_loop(body_len: usize, threads: usize) -> ! {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    println!(
        "floor listening on http://{}",
        listener.local_addr().expect("addr")
    );
    let answer = {
        let mut a = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.apple.mpegurl\r\ncache-control: public, max-age=12\r\n\
             content-length: {body_len}\r\n\r\n"
        )
        .into_bytes();
        a.resize(a.len() + body_len, b'#');
        a
    };
    let text = |s: String| {
        format!(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{s}",
            s.len()
        )
    };
    let mut parked: Vec<std::net::TcpStream> = Vec::new();
    // the connections answered, kept open as kilnd keeps them (the viewers close theirs)
    let mut answered: Vec<std::net::TcpStream> = Vec::new();
    let mut written: Vec<Duration> = Vec::new();
    loop {
        let Ok((mut tcp, _)) = listener.accept() else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 512];
        while !head.ends_with(b"\r\n\r\n") {
            match tcp.read(&mut buf) {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let line = String::from_utf8_lossy(&head);
        let out = match line.split(' ').nth(1).unwrap_or("") {
            "/parked" => text(parked.len().to_string()),
            "/publish" => {
                let at = Instant::now();
                let waiters = std::mem::take(&mut parked);
                let per = waiters.len().div_ceil(threads.max(1)).max(1);
                written = std::thread::scope(|s| {
                    let handles: Vec<_> = waiters
                        .chunks(per)
                        .map(|chunk| {
                            let answer = &answer;
                            s.spawn(move || {
                                let mut w = Vec::with_capacity(chunk.len());
                                for mut c in chunk {
                                    if c.write_all(answer).is_ok() {
                                        w.push(at.elapsed());
                                    }
                                }
                                w
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .flat_map(|h| h.join().expect("writer"))
                        .collect()
                });
                answered.extend(waiters);
                text("published".into())
            }
            "/written" => {
                let mut w = written.clone();
                w.sort();
                let q = |q: f64| {
                    w.get(((w.len().max(1) - 1) as f64 * q) as usize)
                        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
                };
                text(format!(
                    "{} {:.1} {:.1} {:.1}",
                    w.len(),
                    q(0.5),
                    q(0.99),
                    q(1.0)
                ))
            }
            // a whole request head parks; a connection that sent none (closed, or nothing within the read
            // timeout) is dropped
            _ if head.ends_with(b"\r\n\r\n") => {
                parked.push(tcp);
                continue;
            }
            _ => continue,
        };
        let _ = tcp.write_all(out.as_bytes());
    }
}
