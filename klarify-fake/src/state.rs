//! The fake's data set: what it holds, how it changes, and how one page is cut from it.
//!
//! Kept free of HTTP and async so that the awkward semantics (a clock that only moves
//! forward, strict `last_updated_at`, tie order, offset paging over changing data) live in
//! one place and are checked by plain unit tests.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::{index, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use super::org::{self, Organisation};
use super::Churn;

/// What a valid request asks for, already checked by the HTTP layer.
#[derive(Clone, Debug)]
pub(super) struct PageRequest {
    pub page: u64,
    pub page_size: u64,
    pub sort: Sort,
    /// Only items updated strictly after this instant.
    pub since: Option<OffsetDateTime>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Sort {
    pub field: String,
    pub desc: bool,
}

impl Sort {
    /// The order the API uses when no `sort` is given.
    pub fn by_id() -> Sort {
        Sort {
            field: "id".to_string(),
            desc: false,
        }
    }
}

/// The response body, field names as the vendor spells them.
#[derive(Debug, Serialize)]
pub(super) struct Page {
    pub data: Vec<Value>,
    #[serde(rename = "hasNext")]
    pub has_next: bool,
    #[serde(rename = "totalCount")]
    pub total_count: u64,
}

struct Entry {
    /// Served exactly as stored, even when malformed.
    item: Value,
    /// The instant filtering and `updated_at` sorting use; for a malformed item without a
    /// readable `updated_at` it is the fake clock at insertion.
    at: OffsetDateTime,
    /// Insertion order: the last tie-breaker, so that even duplicate ids order stably.
    seq: u64,
}

pub(super) struct Dataset {
    entries: Vec<Entry>,
    /// The next timestamp to hand out. Always after every stored `at`, like a server clock.
    clock: OffsetDateTime,
    next_id: u64,
    next_seq: u64,
    edits: u64,
    churn_rng: StdRng,
    /// Separate from `churn_rng` so that reading pages does not change which items churn picks.
    tie_rng: StdRng,
    /// Sorting is the expensive part of a request; cached per sort until the next mutation.
    sorted: HashMap<Sort, Arc<[usize]>>,
}

impl Dataset {
    pub fn new(org: Organisation, seed: u64) -> Dataset {
        let mut data = Dataset {
            entries: Vec::new(),
            clock: org::empty_org_clock(),
            next_id: org::FIRST_ID,
            next_seq: 0,
            edits: 0,
            churn_rng: StdRng::seed_from_u64(seed),
            tie_rng: StdRng::seed_from_u64(seed ^ 0x5eed_7135),
            sorted: HashMap::new(),
        };
        let items = org.into_items();
        // The clock starts one second after the newest item, not at the empty-org default.
        if let Some(newest) = items.iter().filter_map(parse_updated_at).max() {
            data.clock = whole_second_after(newest);
        }
        for item in items {
            data.insert_raw(item);
        }
        data
    }

    /// All items as served, ordered by id.
    pub fn snapshot(&self) -> Vec<Value> {
        let mut refs: Vec<&Entry> = self.entries.iter().collect();
        refs.sort_by(|a, b| by_id(a, b));
        refs.into_iter().map(|e| e.item.clone()).collect()
    }

    pub fn page(&mut self, req: &PageRequest, unstable_ties: bool) -> Page {
        let mut order = self.sorted_order(&req.sort);
        if unstable_ties {
            let mut shuffled = order.to_vec();
            self.shuffle_ties(&mut shuffled, &req.sort.field);
            order = shuffled.into();
        }
        let entries = &self.entries;
        let after = |i: &usize| req.since.is_none_or(|since| entries[*i].at > since);
        // Sorted by `updated_at`, the filtered items are one contiguous run of the order: a
        // binary search finds it, so paging a million items does not scan them all each time.
        let filtered: Vec<usize>;
        let matching: &[usize] = match (req.sort.field == "updated_at", req.sort.desc) {
            (true, false) => &order[order.partition_point(|i| !after(i))..],
            (true, true) => &order[..order.partition_point(after)],
            (false, _) => {
                filtered = order.iter().copied().filter(after).collect();
                &filtered
            }
        };
        let total = matching.len() as u64;
        let start = req.page.saturating_mul(req.page_size).min(total);
        let end = start.saturating_add(req.page_size).min(total);
        let data = matching[start as usize..end as usize]
            .iter()
            .map(|&i| entries[i].item.clone())
            .collect();
        Page {
            data,
            has_next: total > end,
            total_count: total,
        }
    }

    /// One application of a churn. Deletes come first so edits only touch survivors.
    pub fn apply(&mut self, churn: &Churn) {
        // In bulk mode the first mutation that needs a timestamp takes it for all.
        let mut shared: Option<OffsetDateTime> = None;
        let mut stamp = |data: &mut Dataset| match (churn.bulk, shared) {
            (true, Some(at)) => at,
            (true, None) => *shared.insert(data.tick()),
            (false, _) => data.tick(),
        };
        for _ in 0..churn.deletes.min(self.entries.len()) {
            let victim = self.churn_rng.gen_range(0..self.entries.len());
            self.entries.swap_remove(victim);
            self.sorted.clear();
        }
        let amount = churn.edits.min(self.entries.len());
        let picked = index::sample(&mut self.churn_rng, self.entries.len(), amount).into_vec();
        for i in picked {
            if self.entries[i].item.is_object() {
                let at = stamp(self);
                self.revise(i, at);
            }
        }
        if churn.inserts > 0 {
            let known = self.names();
            for _ in 0..churn.inserts {
                let at = stamp(self);
                self.insert_generated(at, &known);
            }
        }
    }

    /// Edits the first item with this id; false when there is none (or it is not an object).
    pub fn edit(&mut self, id: &str) -> bool {
        let Some(i) = self.entries.iter().position(|e| has_id(&e.item, id)) else {
            return false;
        };
        if !self.entries[i].item.is_object() {
            return false;
        }
        let at = self.tick();
        self.revise(i, at);
        true
    }

    pub fn delete(&mut self, id: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| !has_id(&e.item, id));
        self.sorted.clear();
        self.entries.len() != before
    }

    /// Stores `item` untouched. A readable `updated_at` in the future pushes the clock past
    /// it, so that later edits still look newer, as they would on a real server.
    pub fn insert_raw(&mut self, item: Value) {
        self.insert(item, true);
    }

    /// Stores `item` without the clock following its date: an item dated elsewhere (an
    /// import's placeholder year 9999), which the server's own edits do not come after.
    pub fn insert_misdated(&mut self, item: Value) {
        self.insert(item, false);
    }

    fn insert(&mut self, item: Value, clock_follows: bool) {
        let at = match parse_updated_at(&item) {
            Some(at) => {
                if clock_follows {
                    self.clock = self.clock.max(whole_second_after(at));
                }
                at
            }
            None => self.tick(),
        };
        if let Some(id) = item.get("id").and_then(Value::as_str) {
            if let Ok(numeric) = id.parse::<u64>() {
                self.next_id = self.next_id.max(numeric.saturating_add(1));
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push(Entry { item, at, seq });
        self.sorted.clear();
    }

    fn tick(&mut self) -> OffsetDateTime {
        let at = self.clock;
        self.clock += Duration::SECOND;
        at
    }

    /// A visible change: alternately the status moves on or the name gets a revision mark.
    fn revise(&mut self, i: usize, at: OffsetDateTime) {
        self.edits += 1;
        let edits = self.edits;
        let entry = &mut self.entries[i];
        entry.at = at;
        let item = &mut entry.item;
        item["updated_at"] = Value::String(org::rfc3339(at));
        if edits % 2 == 1 {
            let now = item["status"].as_str().unwrap_or_default();
            let position = org::STATUSES.iter().position(|s| *s == now);
            let next = position.map_or(0, |p| (p + 1) % org::STATUSES.len());
            item["status"] = Value::String(org::STATUSES[next].to_string());
        } else {
            let name = item["name"].as_str().unwrap_or_default();
            let base = match name.rfind(" (rev ") {
                Some(cut) if name.ends_with(')') => &name[..cut],
                _ => name,
            };
            item["name"] = Value::String(format!("{base} (rev {edits})"));
        }
        self.sorted.clear();
    }

    /// The names new items may call; collected once per churn, not per insert.
    fn names(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|e| e.item.get("name").and_then(Value::as_str))
            .map(str::to_string)
            .collect()
    }

    fn insert_generated(&mut self, at: OffsetDateTime, known: &[String]) {
        let id = self.next_id.to_string();
        let name = org::random_name(&mut self.churn_rng);
        let item = org::procedure(&mut self.churn_rng, &id, &name, at, known);
        self.insert_raw(item);
    }

    fn sorted_order(&mut self, sort: &Sort) -> Arc<[usize]> {
        if let Some(order) = self.sorted.get(sort) {
            return order.clone();
        }
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        let entries = &self.entries;
        order.sort_by(|&a, &b| {
            let primary = primary_key(&entries[a], &entries[b], &sort.field);
            let primary = if sort.desc {
                primary.reverse()
            } else {
                primary
            };
            // Ties go by ascending id whatever the direction.
            primary.then_with(|| by_id(&entries[a], &entries[b]))
        });
        let order: Arc<[usize]> = order.into();
        self.sorted.insert(sort.clone(), order.clone());
        order
    }

    /// Models a server whose order is not stable for equal keys: each run of equal sort
    /// keys comes back in a new random order on every request.
    fn shuffle_ties(&mut self, order: &mut [usize], field: &str) {
        let mut start = 0;
        while start < order.len() {
            let first = &self.entries[order[start]];
            let len = order[start..]
                .iter()
                .take_while(|&&i| primary_key(first, &self.entries[i], field).is_eq())
                .count();
            order[start..start + len].shuffle(&mut self.tie_rng);
            start += len;
        }
    }
}

/// `updated_at` compares as instants, every other field by JSON value.
fn primary_key(a: &Entry, b: &Entry, field: &str) -> Ordering {
    if field == "updated_at" {
        a.at.cmp(&b.at)
    } else {
        compare_json(a.item.get(field), b.item.get(field))
    }
}

fn by_id(a: &Entry, b: &Entry) -> Ordering {
    compare_json(a.item.get("id"), b.item.get("id")).then(a.seq.cmp(&b.seq))
}

/// A total order over optional JSON values: missing and null first, then by type, then by
/// value (strings lexicographically, by bytes).
fn compare_json(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    fn rank(v: Option<&Value>) -> u8 {
        match v {
            None | Some(Value::Null) => 0,
            Some(Value::Bool(_)) => 1,
            Some(Value::Number(_)) => 2,
            Some(Value::String(_)) => 3,
            Some(Value::Array(_)) => 4,
            Some(Value::Object(_)) => 5,
        }
    }
    match (a, b) {
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x.total_cmp(&y)
        }
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(x @ (Value::Array(_) | Value::Object(_))), Some(y)) if rank(a) == rank(b) => {
            x.to_string().cmp(&y.to_string())
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

/// Ids are strings by the docs; a malformed item's numeric id is matched by its digits.
fn has_id(item: &Value, id: &str) -> bool {
    match item.get("id") {
        Some(Value::String(s)) => s == id,
        Some(Value::Number(n)) => n.to_string() == id,
        _ => false,
    }
}

fn parse_updated_at(item: &Value) -> Option<OffsetDateTime> {
    let text = item.get("updated_at")?.as_str()?;
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

fn whole_second_after(at: OffsetDateTime) -> OffsetDateTime {
    let utc = at.to_offset(time::UtcOffset::UTC);
    utc.replace_nanosecond(0).expect("0 is a valid nanosecond") + Duration::SECOND
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(sort: Sort, since: Option<OffsetDateTime>) -> PageRequest {
        PageRequest {
            page: 0,
            page_size: 1000,
            sort,
            since,
        }
    }

    fn ids(page: &Page) -> Vec<String> {
        page.data
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn max_at(data: &Dataset) -> OffsetDateTime {
        data.entries.iter().map(|e| e.at).max().unwrap()
    }

    #[test]
    fn clock_starts_after_newest_and_every_mutation_is_strictly_newer() {
        let mut data = Dataset::new(Organisation::generate(5, 100), 1);
        let newest = max_at(&data);
        assert_eq!(data.clock, newest + Duration::SECOND);
        data.apply(&Churn {
            edits: 3,
            inserts: 2,
            deletes: 1,
            bulk: false,
        });
        assert_eq!(data.entries.len(), 101);
        let mut fresh: Vec<OffsetDateTime> = data
            .entries
            .iter()
            .map(|e| e.at)
            .filter(|at| *at > newest)
            .collect();
        fresh.sort();
        fresh.dedup();
        assert_eq!(fresh.len(), 5, "one new second per mutation");
    }

    #[test]
    fn bulk_churn_shares_one_timestamp() {
        let mut data = Dataset::new(Organisation::generate(5, 100), 1);
        let newest = max_at(&data);
        data.apply(&Churn {
            edits: 4,
            inserts: 3,
            deletes: 0,
            bulk: true,
        });
        let fresh: Vec<_> = data.entries.iter().filter(|e| e.at > newest).collect();
        assert_eq!(fresh.len(), 7);
        assert!(fresh.iter().all(|e| e.at == newest + Duration::SECOND));
    }

    #[test]
    fn raw_items_sort_and_filter_by_their_time_or_the_clock() {
        let mut data = Dataset::new(Organisation::generate(5, 10), 1);
        let clock = data.clock;
        data.insert_raw(json!({"id": "zzz", "updated_at": null}));
        data.insert_raw(json!(["not", "an", "object"]));
        data.insert_raw(json!({"id": 7, "updated_at": "2099-01-01T00:00:00.5+02:00"}));
        let newest = request(Sort::by_id(), Some(clock - Duration::SECOND));
        assert_eq!(data.page(&newest, false).total_count, 3);
        // The future timestamp dragged the clock past it.
        assert!(data.edit("10000"));
        let edited = data
            .entries
            .iter()
            .find(|e| has_id(&e.item, "10000"))
            .unwrap();
        assert!(edited.at >= OffsetDateTime::parse("2098-12-31T22:00:01Z", &Rfc3339).unwrap());
        assert!(data.delete("7"));
        assert!(!data.delete("7"));
    }

    #[test]
    fn missing_fields_sort_first_ascending() {
        let mut data = Dataset::new(Organisation::generate(5, 10), 1);
        data.insert_raw(json!({"id": "x1"}));
        let sort = Sort {
            field: "name".into(),
            desc: false,
        };
        assert_eq!(ids(&data.page(&request(sort, None), false))[0], "x1");
    }

    #[test]
    fn unstable_ties_reorder_only_within_equal_keys() {
        let mut data = Dataset::new(Organisation::generate_tied(5, 40), 1);
        let sort = Sort {
            field: "updated_at".into(),
            desc: false,
        };
        let stable = ids(&data.page(&request(sort.clone(), None), false));
        let shuffled = ids(&data.page(&request(sort, None), true));
        assert_ne!(stable, shuffled);
        let (mut a, mut b) = (stable, shuffled);
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn compare_json_orders_types_then_values() {
        let values = [
            None,
            Some(json!(false)),
            Some(json!(2)),
            Some(json!(10)),
            Some(json!("10")),
            Some(json!("9")),
            Some(json!([1])),
        ];
        for pair in values.windows(2) {
            assert_eq!(
                compare_json(pair[0].as_ref(), pair[1].as_ref()),
                Ordering::Less
            );
        }
        assert_eq!(compare_json(None, Some(&Value::Null)), Ordering::Equal);
    }
}
