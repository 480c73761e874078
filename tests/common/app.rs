//! The daemon built as `main` builds it, from settings that point at a test's source and
//! database.

use std::collections::HashMap;
use std::time::Duration;

use klarify_sync::app::Builder;
use klarify_sync::config::Settings;
use klarify_sync::daemon::Pass;

use super::{client_settings, Env};

impl Env {
    /// The settings of a daemon over this source and database, on port 0, with the client and
    /// sync options of [`Env::pass`] and no reconciliation scheduled.
    pub fn settings(&self) -> Settings {
        let mut s = Settings::load(None, &HashMap::new()).unwrap();
        let client = client_settings(&self.fake, self.client.page_size());
        let k = &mut s.klarify;
        k.base_url = client.base_url;
        k.access_key = Some(client.access_key);
        k.page_size = client.page_size;
        k.request_timeout_secs = client.request_timeout.as_secs();
        k.max_attempts = client.max_attempts;
        k.retry_base_delay_ms = client.retry_base_delay.as_millis().try_into().unwrap();
        // Whole seconds are the finest setting; from 1 ms, 4 attempts never reach the cap.
        k.retry_max_delay_secs = 1;
        k.max_body_bytes = client.max_body_bytes;
        k.concurrency = client.concurrency;
        k.max_requests_per_second = client.max_requests_per_second;
        s.database.url = Some(self.database_url.clone());
        s.database.max_connections = 3;
        s.http.listen = "127.0.0.1:0".parse().unwrap();
        s.schedule.backfill_cron = None;
        let o = &self.options;
        s.sync.overlap_secs = o.overlap.as_secs();
        s.sync.max_delete_share = o.max_delete_share;
        s.sync.tie_group_rounds = o.tie_group_rounds;
        s.sync.tie_group_page_size = o.tie_group_page_size;
        s.sync.max_future_skew_secs = o.max_future_skew.as_secs();
        s.health.max_staleness_secs = 600;
        s
    }
}

/// The daemon `settings` describe, running `pass`, retrying failures within milliseconds.
pub fn daemon<P: Pass>(settings: &Settings, pass: P) -> Builder<P> {
    Builder::new(settings, pass).retry_delays(Duration::from_millis(50), Duration::from_millis(200))
}
