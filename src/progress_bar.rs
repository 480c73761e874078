//! The terminal progress bar of `--backfill`: procedures fetched of `totalCount`, rate, ETA.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use crate::sync::Progress;

/// Redraws the bar from `progress` until [`Bar::finish`].
pub struct Bar {
    bar: ProgressBar,
    task: JoinHandle<()>,
}

impl Bar {
    pub fn spawn(progress: Arc<Progress>) -> Self {
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} procedures  {per_sec}  ETA {eta}")
                .expect("the template is valid"),
        );
        let task = tokio::spawn({
            let bar = bar.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    bar.set_length(progress.total.load(Ordering::Relaxed));
                    bar.set_position(progress.fetched.load(Ordering::Relaxed));
                }
            }
        });
        Self { bar, task }
    }

    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
