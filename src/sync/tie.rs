//! The pure part of reading a tie group, the items sharing one `updated_at` (docs/sync.md, "Tie
//! groups"): what one response proves about the group, and when the responses read so far prove
//! that every member was served.
//!
//! Two facts carry the proof. A group can only shrink while it is read: every write gets a
//! timestamp later than every existing one, so an edited member leaves it, a deleted one is gone,
//! and nothing joins. And one response is one consistent snapshot: when it shows where the group
//! ends (the first newer item, or the end of the data), the group held at most that many items at
//! that response's instant. So if at least that many distinct members are served by that response
//! and by responses sent after it arrived, each of them was a member at that instant, and they are
//! all of it. Order, ties in a new order per request, and `totalCount` play no part.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use time::OffsetDateTime;

use crate::klarify::Page;

/// How a member is told apart from the others: its id, or for an item that cannot be understood
/// (which still belongs to the group when it stands before the group's end) a hash of its text.
/// Two distinct items can only ever count as one here, which makes a proof harder, never false.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Id(String),
    Unreadable(u64),
}

/// Responses are numbered by round: a round's requests are sent only after every response of the
/// earlier rounds arrived, so a later round's response is later than all of them.
pub(super) type Round = u32;

/// At most this many measurements are kept; the newest are the tightest.
const KEPT_BOUNDS: usize = 32;

/// What the responses read so far show about the group at `at`.
#[derive(Debug)]
pub(super) struct GroupRead {
    at: OffsetDateTime,
    /// Each member served, with the last round that served it.
    members: HashMap<Key, Round>,
    /// Upper bounds on the group's size, each measured by one response.
    bounds: Vec<Bound>,
    round: Round,
}

#[derive(Debug)]
struct Bound {
    round: Round,
    size: u64,
    /// The members served by the measuring response itself: they count for its bound, where the
    /// other responses of its round do not (they may have been answered before it).
    own: Vec<Key>,
}

impl GroupRead {
    pub fn new(at: OffsetDateTime) -> Self {
        Self {
            at,
            members: HashMap::new(),
            bounds: Vec::new(),
            round: 0,
        }
    }

    /// Starts a round: the requests sent from now on are later than every response recorded.
    pub fn next_round(&mut self) -> Round {
        self.round += 1;
        self.round
    }

    /// Records one response of `round`: the page at `offset` of a request for `asked` items, a
    /// size the server is known to honour when `honoured` (it served a full page of it). Returns
    /// the bound it measured, if it shows where the group ends.
    pub fn record(
        &mut self,
        round: Round,
        offset: u64,
        asked: u64,
        honoured: bool,
        page: &Page,
    ) -> Option<u64> {
        let newer = page
            .items
            .iter()
            .position(|p| p.updated_at > self.at)
            .map(|k| page.positions[k]);
        let served = page.served();
        let own: Vec<Key> = page
            .items
            .iter()
            .filter(|p| p.updated_at == self.at)
            .map(|p| Key::Id(p.id.clone()))
            .chain(
                page.rejected
                    .iter()
                    .filter(|r| newer.is_none_or(|n| r.position < n))
                    .map(|r| Key::Unreadable(hash(&r.raw))),
            )
            .collect();
        for key in &own {
            self.members.insert(key.clone(), round);
        }
        let bound = match newer {
            Some(position) => Some(offset + position as u64),
            // Nothing at or past `offset`: the group ends before it.
            None if served == 0 => Some(offset),
            // A short page of a size the server honours ends the data. Of a larger size it may
            // only be capped silently: then it ends the data only when the server says so too.
            None if (served as u64) < asked
                && (honoured || (!page.has_next && page.total_count <= offset + served as u64)) =>
            {
                Some(offset + served as u64)
            }
            None => None,
        };
        if let Some(size) = bound {
            if self.bounds.len() == KEPT_BOUNDS {
                self.bounds.remove(0);
            }
            self.bounds.push(Bound { round, size, own });
        }
        bound
    }

    /// The tightest bound measured: the group is at most this large now.
    pub fn bound(&self) -> Option<u64> {
        self.bounds.iter().map(|b| b.size).min()
    }

    /// Whether every member the group had at some measured instant has been served since.
    pub fn proven(&self) -> bool {
        self.bounds.iter().any(|b| self.served_since(b) >= b.size)
    }

    /// The tightest measurement and the members served since: what `status` shows of a group
    /// that could not be proven complete.
    pub fn shortfall(&self) -> Option<(u64, u64)> {
        self.bounds
            .iter()
            .min_by_key(|b| b.size)
            .map(|b| (b.size, self.served_since(b)))
    }

    /// Distinct members served by `b`'s own response or by a later round.
    fn served_since(&self, b: &Bound) -> u64 {
        let later = self.members.values().filter(|&&r| r > b.round).count();
        let own = b
            .own
            .iter()
            .filter(|k| self.members.get(*k) == Some(&b.round))
            .count();
        (later + own) as u64
    }
}

fn hash(raw: &str) -> u64 {
    let mut h = DefaultHasher::new();
    raw.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    //! A model of the protocol against a server that shuffles ties on every request and loses
    //! members between requests, checked over many seeded trials: a proof is never false, and a
    //! quiet group is always proven.

    use super::*;
    use crate::klarify::{Procedure, Rejected};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use time::macros::datetime;
    use time::Duration;

    const T: OffsetDateTime = datetime!(2024-01-01 00:00:00 UTC);

    fn item(id: &str, at: OffsetDateTime) -> Procedure {
        crate::klarify::parse_item(&format!(
            r#"{{"id":"{id}","updated_at":"{}"}}"#,
            crate::klarify::format_instant(at)
        ))
        .unwrap()
    }

    /// A server holding `group` members at `T` followed by `newer` items, each later.
    struct Server {
        group: Vec<Procedure>,
        newer: Vec<Procedure>,
        rng: StdRng,
    }

    impl Server {
        fn new(members: usize, newer: usize, rng: StdRng) -> Self {
            Self {
                group: (0..members).map(|k| item(&format!("g{k}"), T)).collect(),
                newer: (0..newer)
                    .map(|k| item(&format!("n{k}"), T + Duration::seconds(k as i64 + 1)))
                    .collect(),
                rng,
            }
        }

        fn page(&mut self, offset: usize, size: usize) -> Page {
            self.group.shuffle(&mut self.rng);
            let total = self.group.len() + self.newer.len();
            let items: Vec<Procedure> = self
                .group
                .iter()
                .chain(&self.newer)
                .skip(offset)
                .take(size)
                .cloned()
                .collect();
            Page {
                positions: (0..items.len()).collect(),
                has_next: offset + items.len() < total,
                total_count: total as u64,
                items,
                rejected: Vec::new(),
            }
        }
    }

    /// Reads like `Reader::read_tie_group` with pages of `size`, letting `churn` remove members
    /// before any request; returns (proven, every member still in the group was served).
    fn read(server: &mut Server, size: usize, churn: f64, rounds: usize) -> (bool, bool) {
        let mut group = GroupRead::new(T);
        let mut served_ids = std::collections::HashSet::new();
        let mut fetch = |server: &mut Server, group: &mut GroupRead, round, k: usize| {
            if server.rng.gen_bool(churn) && !server.group.is_empty() {
                let gone = server.rng.gen_range(0..server.group.len());
                server.group.remove(gone);
            }
            let page = server.page(k * size, size);
            served_ids.extend(
                page.items
                    .iter()
                    .filter(|p| p.updated_at == T)
                    .map(|p| p.id.clone()),
            );
            group.record(round, (k * size) as u64, size as u64, true, &page)
        };
        for _ in 0..rounds {
            let mut k = group.bound().unwrap_or(3 * size as u64) as usize / size;
            let mut forward = false;
            loop {
                let round = group.next_round();
                match fetch(server, &mut group, round, k) {
                    Some(b) if b == (k * size) as u64 && k > 0 && !forward => k -= 1,
                    Some(_) => break,
                    None => {
                        k += 1;
                        forward = true;
                    }
                }
            }
            if group.proven() {
                break;
            }
            let round = group.next_round();
            for page in 0..k {
                fetch(server, &mut group, round, page);
            }
            if group.proven() {
                break;
            }
        }
        // Members that left were edited to a later time (read after the group) or deleted; the
        // ones still at `T` must all have been served.
        let complete = server.group.iter().all(|p| served_ids.contains(&p.id));
        (group.proven(), complete || !group.proven())
    }

    #[test]
    fn a_quiet_group_in_any_order_is_proven() {
        for seed in 0..300 {
            let mut rng = StdRng::seed_from_u64(seed);
            let pages = rng.gen_range(1..=10);
            let (members, newer) = (pages * 10 + rng.gen_range(0..10), rng.gen_range(0..30));
            let mut server = Server::new(members, newer, rng);
            let (proven, complete) = read(&mut server, 10, 0.0, 40);
            assert!(proven && complete, "seed {seed}");
        }
    }

    #[test]
    fn a_proof_is_never_false_while_members_leave() {
        let mut proofs = 0;
        for seed in 0..1000 {
            let mut rng = StdRng::seed_from_u64(seed);
            let churn = [0.05, 0.2, 0.5][seed as usize % 3];
            let (members, newer) = (rng.gen_range(10..60), rng.gen_range(0..20));
            let mut server = Server::new(members, newer, rng);
            let (proven, complete) = read(&mut server, 10, churn, 20);
            assert!(
                complete,
                "seed {seed}: a proof accepted an incomplete reading"
            );
            proofs += usize::from(proven);
        }
        assert!(
            proofs > 500,
            "only {proofs} of 1000 groups proven: the check says little"
        );
    }

    #[test]
    fn a_page_holding_the_whole_group_proves_it_alone() {
        let mut server = Server::new(25, 5, StdRng::seed_from_u64(1));
        let mut group = GroupRead::new(T);
        let round = group.next_round();
        assert_eq!(
            group.record(round, 0, 26, true, &server.page(0, 26)),
            Some(25)
        );
        assert!(group.proven());
    }

    #[test]
    fn other_responses_of_the_measuring_round_do_not_count() {
        let mut group = GroupRead::new(T);
        let round = group.next_round();
        let members = Page {
            items: vec![item("a", T), item("b", T)],
            positions: vec![0, 1],
            rejected: Vec::new(),
            has_next: true,
            total_count: 5,
        };
        // Served in the same round as the measurement, perhaps before its instant.
        assert_eq!(group.record(round, 0, 2, true, &members), None);
        let end = Page {
            items: vec![item("c", T), item("n", T + Duration::SECOND)],
            positions: vec![0, 1],
            rejected: Vec::new(),
            has_next: false,
            total_count: 4,
        };
        assert_eq!(group.record(round, 2, 2, true, &end), Some(3));
        assert!(!group.proven());
        assert_eq!(group.shortfall(), Some((3, 1)));
        let round = group.next_round();
        group.record(round, 0, 2, true, &members);
        assert!(group.proven());
    }

    #[test]
    fn unreadable_items_before_the_end_are_members() {
        let mut group = GroupRead::new(T);
        let round = group.next_round();
        let page = Page {
            items: vec![item("a", T), item("n", T + Duration::SECOND)],
            positions: vec![0, 2],
            rejected: vec![
                Rejected {
                    raw: "{}".into(),
                    reason: "no id".into(),
                    position: 1,
                },
                Rejected {
                    raw: "[]".into(),
                    reason: "no id".into(),
                    position: 3,
                },
            ],
            has_next: false,
            total_count: 4,
        };
        assert_eq!(group.record(round, 0, 4, true, &page), Some(2));
        assert!(group.proven());
    }

    #[test]
    fn a_short_page_ends_the_group_when_its_size_is_honoured_or_the_server_agrees() {
        let short = |has_next, total_count| Page {
            items: vec![item("a", T)],
            positions: vec![0],
            rejected: Vec::new(),
            has_next,
            total_count,
        };
        let mut group = GroupRead::new(T);
        let round = group.next_round();
        assert_eq!(group.record(round, 10, 5, true, &short(true, 99)), Some(11));
        // A larger page than the server is known to honour may have been capped.
        assert_eq!(group.record(round, 10, 50, false, &short(true, 11)), None);
        assert_eq!(group.record(round, 10, 50, false, &short(false, 99)), None);
        assert_eq!(
            group.record(round, 10, 50, false, &short(false, 11)),
            Some(11)
        );
        let empty = Page {
            items: Vec::new(),
            positions: Vec::new(),
            rejected: Vec::new(),
            has_next: true,
            total_count: 99,
        };
        assert_eq!(group.record(round, 10, 50, false, &empty), Some(10));
    }
}
