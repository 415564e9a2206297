//! Data planes that went away, for `GetStatus.recently_disconnected`: an operator asking "where did node X go?"
//! sees when it left and why, for `DEPARTED_FOR` after it left, unless it has connected again since.
//!
//! Each replica keeps the streams that closed on it (at most `DEPARTED_MAX`, in memory: a restart forgets them) and
//! publishes them with its connected ones, as rows whose stream is `departed/<id>`, whose status is an encoded
//! `DisconnectedDataPlane`, and whose `heartbeat_at` is the moment the stream closed (so a replica of an earlier
//! version, which reads rows heartbeated in the last few seconds only, soon stops reading them). A connected row
//! whose replica stopped heartbeating it (the replica died without withdrawing it) also counts as departed, from its
//! last heartbeat.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fhirgw_config::tenant::system_to_timestamp;
use fhirgw_proto::admin::v1 as admin;

use super::DataPlane;

/// How long a data plane that left is listed.
pub const DEPARTED_FOR: Duration = Duration::from_secs(15 * 60);
/// At most this many are listed (the most recent), and each replica keeps at most this many.
pub const DEPARTED_MAX: usize = 100;
/// The stream column of a departed data plane's row.
pub(super) const ROW_PREFIX: &str = "departed/";

/// A stream that closed on this replica.
#[derive(Debug, Clone)]
pub(super) struct Departed {
    pub stream: u64,
    pub dp: DataPlane,
    pub at: SystemTime,
    pub reason: String,
}

/// This replica's departed streams, newest first.
#[derive(Debug, Default)]
pub(super) struct List(Mutex<VecDeque<Departed>>);

impl List {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Departed>> {
        // Nothing can be left half-updated by a panic here (push, truncate, pop): the data is still good.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, departed: Departed) {
        let mut list = self.lock();
        list.push_front(departed);
        prune(&mut list, SystemTime::now());
    }

    /// Those that left within `DEPARTED_FOR` of `now`, newest first.
    pub fn current(&self, now: SystemTime) -> Vec<Departed> {
        let mut list = self.lock();
        prune(&mut list, now);
        list.iter().cloned().collect()
    }
}

fn prune(list: &mut VecDeque<Departed>, now: SystemTime) {
    list.truncate(DEPARTED_MAX);
    while list.back().is_some_and(|d| now.duration_since(d.at).unwrap_or_default() > DEPARTED_FOR) {
        list.pop_back();
    }
}

pub(super) fn millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(super) fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(super) fn entry(status: admin::DataPlaneStatus, at: SystemTime, reason: String) -> admin::DisconnectedDataPlane {
    admin::DisconnectedDataPlane { data_plane: Some(status), disconnected_at: Some(system_to_timestamp(at)), reason }
}

fn at_of(d: &admin::DisconnectedDataPlane) -> Option<(i64, i32)> {
    d.disconnected_at.as_ref().map(|t| (t.seconds, t.nanos))
}

fn node_of(d: &admin::DisconnectedDataPlane) -> &str {
    d.data_plane.as_ref().map_or("", |s| s.node_id.as_str())
}

/// The list `GetStatus` answers: data planes that left (here or on any replica) and are not connected now, one
/// entry per node (its latest departure), newest first, at most `DEPARTED_MAX`.
pub(super) fn combine(
    departed: impl IntoIterator<Item = admin::DisconnectedDataPlane>,
    connected: &[admin::DataPlaneStatus],
    now: SystemTime,
) -> Vec<admin::DisconnectedDataPlane> {
    let oldest = system_to_timestamp(now.checked_sub(DEPARTED_FOR).unwrap_or(UNIX_EPOCH));
    let mut by_node: HashMap<String, admin::DisconnectedDataPlane> = HashMap::new();
    for d in departed {
        if connected.iter().any(|c| c.node_id == node_of(&d)) || at_of(&d) < Some((oldest.seconds, oldest.nanos)) {
            continue;
        }
        if by_node.get(node_of(&d)).is_none_or(|have| at_of(&d) > at_of(have)) {
            by_node.insert(node_of(&d).to_owned(), d);
        }
    }
    let mut out: Vec<_> = by_node.into_values().collect();
    out.sort_by(|a, b| at_of(b).cmp(&at_of(a)).then_with(|| node_of(a).cmp(node_of(b))));
    out.truncate(DEPARTED_MAX);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn dp(node: &str) -> DataPlane {
        DataPlane {
            node_id: node.into(),
            hostname: String::new(),
            build_version: String::new(),
            peer: String::new(),
            connected_at: SystemTime::now(),
            subscribed: BTreeSet::new(),
            known: BTreeMap::new(),
            applied_version: String::new(),
            acked_revision: 0,
            last_ack: None,
            last_nack: None,
            held_store_id: String::new(),
            held_system_version: 0,
            identity: String::new(),
        }
    }

    fn gone(node: &str, secs_ago: u64) -> admin::DisconnectedDataPlane {
        let status = admin::DataPlaneStatus { node_id: node.into(), ..Default::default() };
        entry(status, SystemTime::now() - Duration::from_secs(secs_ago), format!("left {secs_ago}s ago"))
    }

    #[test]
    fn the_list_is_bounded_in_time_and_length() {
        let list = List::default();
        let now = SystemTime::now();
        list.push(Departed {
            stream: 0,
            dp: dp("old"),
            at: now - DEPARTED_FOR - Duration::from_secs(1),
            reason: "x".into(),
        });
        for i in 1..=DEPARTED_MAX as u64 + 5 {
            list.push(Departed { stream: i, dp: dp(&format!("n{i}")), at: now, reason: "closed".into() });
        }
        let current = list.current(now);
        assert_eq!(current.len(), DEPARTED_MAX);
        assert_eq!(current[0].stream, DEPARTED_MAX as u64 + 5, "newest first");
        assert!(current.iter().all(|d| d.dp.node_id != "old"));
        // Time alone also prunes.
        let later = list.current(now + DEPARTED_FOR + Duration::from_secs(1));
        assert!(later.is_empty());
    }

    #[test]
    fn combine_keeps_the_latest_departure_of_nodes_not_connected() {
        let connected = [admin::DataPlaneStatus { node_id: "back".into(), ..Default::default() }];
        let out = combine(
            [gone("a", 30), gone("a", 5), gone("back", 1), gone("b", 10), gone("ancient", DEPARTED_FOR.as_secs() + 60)],
            &connected,
            SystemTime::now(),
        );
        let got: Vec<(&str, &str)> = out.iter().map(|d| (node_of(d), d.reason.as_str())).collect();
        assert_eq!(got, [("a", "left 5s ago"), ("b", "left 10s ago")]);
        let many: Vec<_> = (0..DEPARTED_MAX as u64 + 10).map(|i| gone(&format!("n{i}"), i)).collect();
        assert_eq!(combine(many, &[], SystemTime::now()).len(), DEPARTED_MAX);
    }

    #[test]
    fn millis_round_trip() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(from_millis(millis(at)), at);
        assert_eq!(from_millis(-5), UNIX_EPOCH);
    }
}
