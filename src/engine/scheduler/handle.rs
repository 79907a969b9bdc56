//! A scheduler on its own thread, driven over channels by any number of threads or tasks.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{Event, Metrics, ModelInfo, Request, RequestId, Scheduler, SchedulerOptions};
use crate::engine::Engine;
use crate::error::{Error, Result};

enum Command {
    Submit(
        Request,
        UnboundedSender<Event>,
        mpsc::Sender<Result<RequestId>>,
    ),
    Cancel(RequestId),
}

/// A submitted request: its id and its events.
pub struct Submission {
    pub id: RequestId,
    pub events: UnboundedReceiver<Event>,
}

/// A scheduler running on its own thread; cheap to clone, usable from any thread or task.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Mutex<Metrics>>,
    info: ModelInfo,
}

impl SchedulerHandle {
    /// Starts the engine thread: `load` builds the engine there (backends may bind resources
    /// to the thread that creates them). Returns once the engine is loaded, or its error.
    pub fn spawn<F>(load: F, opts: SchedulerOptions) -> Result<Self>
    where
        F: FnOnce() -> Result<Engine> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("r1-engine".into())
            .spawn(move || {
                let engine = match load() {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let sched = Scheduler::new(engine, opts);
                let _ = ready_tx.send(Ok((sched.metrics_handle(), sched.info.clone())));
                engine_loop(sched, rx);
            })
            .map_err(|e| Error::Backend {
                backend: "scheduler".into(),
                message: format!("cannot start the engine thread: {e}"),
            })?;
        let (metrics, info) = ready_rx.recv().map_err(|_| Error::Backend {
            backend: "scheduler".into(),
            message: "the engine thread died while loading".into(),
        })??;
        Ok(SchedulerHandle { tx, metrics, info })
    }

    /// Queues a request. Errors (bad input) come back here; after that everything arrives on
    /// the receiver. Dropping the receiver cancels the request.
    pub fn submit(&self, req: Request) -> Result<Submission> {
        let (etx, erx) = unbounded_channel();
        let (rtx, rrx) = mpsc::channel();
        let gone = || Error::Backend {
            backend: "scheduler".into(),
            message: "the engine thread has stopped".into(),
        };
        self.tx
            .send(Command::Submit(req, etx, rtx))
            .map_err(|_| gone())?;
        let id = rrx.recv().map_err(|_| gone())??;
        Ok(Submission { id, events: erx })
    }

    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

fn engine_loop(mut sched: Scheduler, rx: mpsc::Receiver<Command>) {
    let handle = |sched: &mut Scheduler, cmd: Command| match cmd {
        Command::Submit(req, events, reply) => {
            let _ = reply.send(sched.submit_with(req, events));
        }
        Command::Cancel(id) => sched.cancel(id),
    };
    loop {
        if !sched.has_work() {
            match rx.recv() {
                Ok(cmd) => handle(&mut sched, cmd),
                Err(_) => return, // every handle dropped and nothing left to do
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut sched, cmd);
        }
        sched.step();
    }
}
