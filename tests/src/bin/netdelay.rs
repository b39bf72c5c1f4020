//! `netdelay`: a TCP relay that holds every chunk for a fixed one-way delay in each direction,
//! for benchmarking the cluster over a slow network on kernels without `sch_netem`
//! (scripts/bench-netns.sh uses it then; a kernel rate limit can still shape the links).
//!
//!   netdelay --delay-us 500 LISTEN=TARGET [LISTEN=TARGET ...]
//!
//! Each direction of each connection is a reader thread that stamps chunks as they arrive and
//! a writer thread that sends each one when its stamp plus the delay has passed, so the delay
//! does not stack up behind earlier chunks (like netem, unlike a sleep per read). Timer slack
//! makes the delay some tens of µs longer than asked, never shorter.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    if let Err(e) = run() {
        eprintln!("netdelay: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mut delay = None;
    let mut routes = Vec::new();
    while let Some(a) = args.next() {
        if a == "--delay-us" {
            let v = args.next().ok_or("--delay-us needs a value")?;
            delay = Some(Duration::from_micros(v.parse()?));
        } else if let Some((l, t)) = a.split_once('=') {
            routes.push((l.to_string(), t.to_string()));
        } else {
            return Err(format!(
                "unexpected argument {a:?}; usage: netdelay --delay-us N LISTEN=TARGET ..."
            )
            .into());
        }
    }
    let delay = delay.ok_or("--delay-us is required")?;
    if routes.is_empty() {
        return Err("no LISTEN=TARGET routes given".into());
    }
    let mut listeners = Vec::new();
    for (listen, target) in routes {
        let l = TcpListener::bind(&listen).map_err(|e| format!("binding {listen}: {e}"))?;
        listeners.push(thread::spawn(move || accept(l, target, delay)));
    }
    for l in listeners {
        l.join().map_err(|_| "a listener thread panicked")?;
    }
    Ok(())
}

fn accept(listener: TcpListener, target: String, delay: Duration) {
    for conn in listener.incoming() {
        let relay = || -> Result<(), Error> {
            let client = conn?;
            let server = TcpStream::connect(&target)?;
            for s in [&client, &server] {
                s.set_nodelay(true)?;
            }
            pipe(client.try_clone()?, server.try_clone()?, delay);
            pipe(server, client, delay);
            Ok(())
        };
        if let Err(e) = relay() {
            eprintln!("netdelay: connection to {target}: {e}");
        }
    }
}

/// Relays `from` to `to`, each chunk `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` ends the writer once the chunks in flight are out.
    });
    thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
