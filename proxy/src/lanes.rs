//! Session lanes: a few threads, each running a current-thread tokio runtime, that run the
//! PostgreSQL sessions. A session's task, its client and upstream sockets and its timers all
//! belong to one lane, so a round trip (client readable, upstream write, upstream readable,
//! client write) wakes no other thread: no work stealing, no cross-thread unpark per query.
//! The main multi-thread runtime keeps the listeners, the API, the expiry loop and the store.
//!
//! A new session goes to the lane with the fewest sessions. A lane's sessions share its
//! thread, so nothing on a session's path may block (the audit log never does: see
//! `audit::writer`).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The session threads. Dropping it stops them; sessions still running on them are dropped.
pub struct Lanes {
    lanes: Vec<Lane>,
}

struct Lane {
    handle: Handle,
    /// Sessions running on this lane.
    sessions: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Lanes {
    /// Starts `n` lanes (`0`: one per CPU the process may use).
    pub fn start(n: usize) -> io::Result<Lanes> {
        let n = match n {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut lanes = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("jitgate-lane-{i}"))
                .spawn(move || {
                    // Spawned sessions run while this thread waits here.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            lanes.push(Lane {
                handle,
                sessions: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Lanes { lanes })
    }

    /// How many lanes run sessions.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Whether there are no lanes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Sessions running on each lane.
    pub fn loads(&self) -> Vec<usize> {
        self.lanes.iter().map(|l| l.sessions.load(Ordering::Relaxed)).collect()
    }

    /// Moves `tcp` (accepted on another runtime) to the least busy lane and runs
    /// `session(tcp)` there. The socket is registered with that lane's reactor, so its
    /// readiness wakes that lane's thread only.
    pub fn spawn<F, Fut>(&self, tcp: TcpStream, session: F) -> io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = tcp.into_std()?;
        let Some(lane) = self.lanes.iter().min_by_key(|l| l.sessions.load(Ordering::Relaxed)) else {
            return Err(io::Error::other("no session lanes"));
        };
        let count = Arc::clone(&lane.sessions);
        count.fetch_add(1, Ordering::Relaxed);
        lane.handle.spawn(async move {
            let _running = Running(count);
            match TcpStream::from_std(std) {
                Ok(tcp) => session(tcp).await,
                Err(error) => tracing::warn!(%error, "cannot move a connection to its session lane"),
            }
        });
        Ok(())
    }
}

/// Counts a session on its lane while it runs.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for lane in &mut self.lanes {
            drop(lane.stop.take());
        }
        for lane in &mut self.lanes {
            if let Some(thread) = lane.thread.take() {
                if thread.join().is_err() {
                    tracing::error!("a session lane panicked");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_run_on_lane_threads_spread_by_load_with_their_sockets() {
        let lanes = Lanes::start(2).unwrap();
        assert_eq!(lanes.len(), 2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let (names_tx, mut names_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let client = TcpStream::connect(addr).await.unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let names = names_tx.clone();
            lanes
                .spawn(tcp, move |mut tcp| async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    names.send(name).unwrap();
                    // The socket works on the lane's reactor: echo until EOF.
                    let mut buf = [0u8; 64];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => tcp.write_all(&buf[..n]).await.unwrap(),
                        }
                    }
                })
                .unwrap();
            clients.push(client);
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(names_rx.recv().await.unwrap().unwrap());
        }
        seen.sort();
        assert_eq!(
            seen,
            ["jitgate-lane-0", "jitgate-lane-0", "jitgate-lane-1", "jitgate-lane-1"]
        );
        assert_eq!(lanes.loads(), [2, 2]);
        for client in &mut clients {
            client.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"ping");
        }
        drop(clients);
        let start = std::time::Instant::now();
        while lanes.loads() != [0, 0] && start.elapsed() < std::time::Duration::from_secs(10) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(lanes.loads(), [0, 0]);
        tokio::task::spawn_blocking(move || drop(lanes)).await.unwrap();
    }
}
