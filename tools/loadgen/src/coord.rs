//! The parent's side of a run: starts the shards (worker processes, or
//! threads for a run that fits one process and for tests), sends them
//! their plan, waits at the barriers, and keeps the live progress line.
//!
//! Each shard speaks [`crate::wire`] over a [`Link`]. A worker process is
//! this executable re-run as `loadgen shard`: its stdin brings the parent's
//! messages, its stdout carries its own, one JSON line each, and its stderr
//! is the parent's. One reader thread per shard turns its lines into
//! messages on one channel, so the parent waits on all shards at once.

use crate::cli::Plan;
use crate::wire::{Progress, ShardReport, ToParent, ToShard};
use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the progress line is redrawn.
const PROGRESS_REDRAW: Duration = Duration::from_millis(250);
/// How long an exited shard process may take to be reaped before it is killed.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// How shards run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawn {
    /// Each shard a `loadgen shard` process.
    Processes,
    /// Each shard a thread of this process (one shard, or tests).
    Threads,
}

/// A shard's connection to its parent.
pub trait Link {
    fn send(&mut self, msg: &ToParent);
    /// The parent's next message, if one arrived; `Err` once the parent is gone.
    fn try_recv(&mut self) -> Result<Option<ToShard>, String>;
}

/// A [`Link`] over channels of JSON lines: `lines` from the parent (`None`
/// when it is gone), `out` to it.
pub struct ChannelLink {
    lines: Receiver<Option<String>>,
    out: Box<dyn FnMut(&str) + Send>,
}

impl Link for ChannelLink {
    fn send(&mut self, msg: &ToParent) {
        let line = serde_json::to_string(msg).expect("messages serialize");
        (self.out)(&line);
    }

    fn try_recv(&mut self) -> Result<Option<ToShard>, String> {
        match self.lines.try_recv() {
            Ok(Some(line)) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| format!("bad message from the parent: {e}: {line}")),
            Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                Err("the parent process is gone".into())
            }
            Err(mpsc::TryRecvError::Empty) => Ok(None),
        }
    }
}

impl ChannelLink {
    /// Blocks for the parent's first message.
    pub fn recv_blocking(&mut self, timeout: Duration) -> Result<ToShard, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(Some(line)) => serde_json::from_str(&line)
                .map_err(|e| format!("bad message from the parent: {e}: {line}")),
            _ => Err("no plan from the parent".into()),
        }
    }
}

/// The link of a `loadgen shard` process: stdin read by a thread, stdout
/// written line by line.
pub fn process_link() -> ChannelLink {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    ChannelLink {
        lines: rx,
        out: Box::new(|line| {
            let mut out = io::stdout().lock();
            // A parent that is gone shows up on stdin; ignore the write error here.
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        }),
    }
}

/// Where a shard's messages come from: (shard, line), `None` when it is gone.
type Inbox = Receiver<(usize, Option<String>)>;

enum Input {
    Pipe(ChildStdin),
    Chan(Sender<Option<String>>),
}

/// Which barrier a shard has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Started,
    Ready,
    Done,
    Finished,
}

/// The shards of a run.
pub struct Coordinator {
    inputs: Vec<Option<Input>>,
    inbox: Inbox,
    children: Vec<Child>,
    threads: Vec<JoinHandle<()>>,
    stages: Vec<Stage>,
    gone: Vec<bool>,
    pub reports: Vec<ShardReport>,
    pub progress: Vec<Progress>,
    line: ProgressLine,
}

impl Coordinator {
    /// Starts `plan.connect.processes` shards and sends each its plan.
    pub fn spawn(plan: &Plan, how: Spawn) -> Result<Self, String> {
        let n = plan.connect.processes;
        let (tx, inbox) = mpsc::channel();
        let mut c = Self {
            inputs: Vec::with_capacity(n),
            inbox,
            children: Vec::new(),
            threads: Vec::new(),
            stages: vec![Stage::Started; n],
            gone: vec![false; n],
            reports: vec![ShardReport::default(); n],
            progress: vec![Progress::default(); n],
            line: ProgressLine::new(),
        };
        for i in 0..n {
            match how {
                Spawn::Processes => c.spawn_process(i, tx.clone())?,
                Spawn::Threads => c.spawn_thread(i, tx.clone()),
            }
            let start = ToShard::Start {
                shard: i,
                plan: Box::new(plan.clone()),
            };
            c.send(i, &start)?;
        }
        Ok(c)
    }

    fn spawn_process(
        &mut self,
        i: usize,
        tx: Sender<(usize, Option<String>)>,
    ) -> Result<(), String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this executable to start workers: {e}"))?;
        let mut child = Command::new(exe)
            .arg("shard")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start worker process {i}: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        self.inputs.push(child.stdin.take().map(Input::Pipe));
        self.children.push(child);
        self.threads.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send((i, Some(l))).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send((i, None));
        }));
        Ok(())
    }

    fn spawn_thread(&mut self, i: usize, tx: Sender<(usize, Option<String>)>) {
        let (to_shard, lines) = mpsc::channel();
        self.inputs.push(Some(Input::Chan(to_shard)));
        self.threads.push(std::thread::spawn(move || {
            let out_tx = tx.clone();
            let mut link = ChannelLink {
                lines,
                out: Box::new(move |line| {
                    let _ = out_tx.send((i, Some(line.to_string())));
                }),
            };
            crate::shard::main(&mut link);
            let _ = tx.send((i, None));
        }));
    }

    pub fn shards(&self) -> usize {
        self.stages.len()
    }

    pub fn send(&mut self, i: usize, msg: &ToShard) -> Result<(), String> {
        let line = serde_json::to_string(msg).expect("messages serialize");
        let ok = match &mut self.inputs[i] {
            Some(Input::Pipe(p)) => writeln!(p, "{line}").and_then(|()| p.flush()).is_ok(),
            Some(Input::Chan(c)) => c.send(Some(line)).is_ok(),
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("worker {i} is gone"))
        }
    }

    pub fn broadcast(&mut self, msg: &ToShard) -> Result<(), String> {
        (0..self.shards()).try_for_each(|i| self.send(i, msg))
    }

    /// Handles the shards' messages for up to `wait`, returning early when
    /// a shard passes a barrier; `Err` when one failed or exited before
    /// finishing.
    pub fn pump(&mut self, wait: Duration) -> Result<(), String> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let (i, line) = match self.inbox.recv_timeout(left) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => {
                    if self.stages.iter().all(|&s| s == Stage::Finished) {
                        return Ok(());
                    }
                    return Err("every worker is gone".into());
                }
            };
            let Some(line) = line else {
                self.gone[i] = true;
                if self.stages[i] < Stage::Finished {
                    return Err(format!("worker {i} exited before finishing"));
                }
                continue;
            };
            let msg: ToParent = serde_json::from_str(&line)
                .map_err(|e| format!("worker {i} sent a bad message ({e}): {line}"))?;
            match msg {
                ToParent::Progress(p) => self.progress[i] = p,
                ToParent::Ready(r) => {
                    self.advance(i, Stage::Ready, *r);
                    return Ok(());
                }
                ToParent::Done(r) => {
                    self.advance(i, Stage::Done, *r);
                    return Ok(());
                }
                ToParent::Finished(r) => {
                    self.advance(i, Stage::Finished, *r);
                    return Ok(());
                }
                ToParent::Failed { error } => return Err(format!("worker {i}: {error}")),
            }
            if Instant::now() >= until {
                return Ok(());
            }
        }
    }

    fn advance(&mut self, i: usize, stage: Stage, r: ShardReport) {
        self.stages[i] = stage;
        self.reports[i] = r;
    }

    /// Waits until every shard has reached `stage`, or `deadline`; redraws
    /// the progress line (on a terminal) with `what` meanwhile.
    pub fn barrier(&mut self, stage: Stage, deadline: Instant, what: &str) -> Result<(), String> {
        let mut next_draw = Instant::now();
        while self.stages.iter().any(|&s| s < stage) {
            let now = Instant::now();
            if now >= deadline {
                self.line.clear();
                return Err(format!(
                    "{} of {} workers did not reach {stage:?} in time",
                    self.stages.iter().filter(|&&s| s < stage).count(),
                    self.shards()
                ));
            }
            if now >= next_draw {
                next_draw = now + PROGRESS_REDRAW;
                self.draw(what);
            }
            self.pump(PROGRESS_REDRAW.min(deadline - now))?;
        }
        self.line.clear();
        Ok(())
    }

    /// Redraws the progress line from the shards' latest counts.
    pub fn draw(&mut self, what: &str) {
        let p = self
            .progress
            .iter()
            .fold(Progress::default(), |a, p| Progress {
                started: a.started + p.started,
                open: a.open + p.open,
                in_flight: a.in_flight + p.in_flight,
                failed: a.failed + p.failed,
                received: a.received + p.received,
            });
        self.line.draw(what, &p, self.shards());
    }

    /// Waits for the worker processes to exit (they do after `Finished`)
    /// and the reader threads to end.
    pub fn finish(mut self) -> Result<(), String> {
        self.inputs.clear();
        let deadline = Instant::now() + REAP_TIMEOUT;
        let mut problems = Vec::new();
        for (i, mut child) in std::mem::take(&mut self.children).into_iter().enumerate() {
            loop {
                match child.try_wait() {
                    Ok(Some(st)) if st.success() => break,
                    Ok(Some(st)) => {
                        problems.push(format!("worker {i} exited with {st}"));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        problems.push(format!("worker {i} did not exit; killed"));
                        break;
                    }
                }
            }
        }
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for Coordinator {
    /// On an error path: closing the inputs tells every shard to stop; a
    /// process that does not within the reap timeout is killed.
    fn drop(&mut self) {
        self.line.clear();
        self.inputs.clear();
        let deadline = Instant::now() + REAP_TIMEOUT;
        for child in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The live progress line: drawn over itself on a terminal, never otherwise.
pub struct ProgressLine {
    tty: bool,
    t0: Instant,
    drawn: bool,
}

impl ProgressLine {
    pub fn new() -> Self {
        Self {
            tty: io::stderr().is_terminal(),
            t0: Instant::now(),
            drawn: false,
        }
    }

    pub fn draw(&mut self, what: &str, p: &Progress, shards: usize) {
        if !self.tty {
            return;
        }
        let text = format!(
            "{:>6.1}s {what}: {} open, {} in flight, {} failed, {} received ({shards} proc)",
            self.t0.elapsed().as_secs_f64(),
            p.open,
            p.in_flight,
            p.failed,
            p.received
        );
        eprint!("\r\x1b[2K{text}");
        self.drawn = true;
    }

    pub fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}
