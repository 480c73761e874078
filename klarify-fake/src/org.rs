//! Sample organisations: plausible procedures for the fake server to serve.
//!
//! The data has to look like a real Klarify tenant so that the sync is exercised on the
//! awkward parts the vendor warns about: names that are not unique, calls to names no
//! procedure has, many items sharing one `updated_at`. Everything derives from a seed so a
//! failing test or benchmark can be replayed exactly.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// A fixed "now" instead of the wall clock, so that the same seed gives the same data on
/// every run; the timestamps spread over the year before it.
const NOW: OffsetDateTime = datetime!(2025-06-01 09:00:00 UTC);
const YEAR_SECS: i64 = 365 * 24 * 3600;
/// Ids are numeric strings like the vendor's example. Gaps between them keep clients from
/// assuming ids are dense, and once past 99999 string order stops matching numeric order.
pub(super) const FIRST_ID: u64 = 10_000;

const TOPICS: &[&str] = &[
    "Customer Onboarding",
    "Invoice Approval",
    "Employee Offboarding",
    "Purchase Order",
    "Incident Management",
    "Change Request",
    "Vendor Evaluation",
    "Expense Reimbursement",
    "Contract Renewal",
    "Quality Audit",
    "Sales Pipeline",
    "Payroll Run",
    "Leave Request",
    "Complaint Handling",
    "Data Access Request",
    "Product Launch",
    "Budget Planning",
    "Recruitment",
    "Laptop Provisioning",
    "Return Handling",
];
const KINDS: &[&str] = &[
    "Process",
    "Subprocess",
    "Task",
    "Procedure",
    "Review",
    "Checklist",
];
const QUALIFIERS: &[&str] = &[
    "",
    "",
    "",
    "EMEA ",
    "US ",
    "Quarterly ",
    "Annual ",
    "Urgent ",
    "Internal ",
    "B2B ",
];
/// Names of procedures that were deleted or never modelled. None ends in a word of
/// `KINDS`, so no generated procedure can carry one of them: references to them never resolve.
const PHANTOMS: &[&str] = &[
    "Legacy Approval Workflow",
    "Old Ticket Routing Flow",
    "SAP Migration Playbook (retired)",
    "Vendor Onboarding v1 (retired)",
    "Manual Invoice Entry Flow",
];
pub(super) const STATUSES: &[&str] = &["published", "draft", "archived"];
const DEPARTMENTS: &[&str] = &[
    "Customer Service",
    "Account Management",
    "Finance",
    "Human Resources",
    "IT Operations",
    "Legal",
    "Procurement",
    "Sales",
    "Marketing",
    "Quality Assurance",
    "Facilities",
];
const FIRST_NAMES: &[&str] = &[
    "John", "Maria", "Ahmed", "Sofia", "Liam", "Yuki", "Olga", "Pierre", "Grace", "Tomasz",
];
const LAST_NAMES: &[&str] = &[
    "Smith", "Garcia", "Khan", "Rossi", "Murphy", "Tanaka", "Ivanova", "Dubois", "Okafor", "Nowak",
];

/// A set of procedures, each held exactly as the API serves it.
#[derive(Clone, Debug)]
pub struct Organisation {
    items: Vec<Value>,
}

impl Organisation {
    /// Deterministic realistic sample of `n` procedures; see the module docs for its traps.
    pub fn generate(seed: u64, n: usize) -> Organisation {
        let mut rng = StdRng::seed_from_u64(seed);
        let names = unique_ish_names(&mut rng, n);
        let times = spread_times(&mut rng, n);
        let mut id = FIRST_ID;
        let mut items: Vec<Value> = names
            .iter()
            .zip(times)
            .map(|(name, at)| {
                let item = procedure(&mut rng, &id.to_string(), name, at, &names);
                id += rng.gen_range(1..=3);
                item
            })
            .collect();
        guarantee_call_traps(&mut items, &names);
        Organisation { items }
    }

    /// The same sample as `generate`, but imported in bulk: one `updated_at` for all.
    pub fn generate_tied(seed: u64, n: usize) -> Organisation {
        let mut org = Organisation::generate(seed, n);
        let at = rfc3339(NOW - Duration::days(30));
        for item in &mut org.items {
            item["updated_at"] = Value::String(at.clone());
        }
        org
    }

    /// The sample of `generate`, where consecutive runs of `groups[k]` procedures (taken in id
    /// order, from the first) were each imported in bulk at an instant of their own, a week
    /// apart and within the sample's year; the rest keep their own instants.
    pub fn generate_grouped(seed: u64, n: usize, groups: &[usize]) -> Organisation {
        let mut org = Organisation::generate(seed, n);
        let mut items = org.items.iter_mut();
        for (k, &size) in groups.iter().enumerate() {
            let at = rfc3339(NOW - Duration::weeks(1 + k as i64));
            for item in items.by_ref().take(size) {
                item["updated_at"] = Value::String(at.clone());
            }
        }
        org
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn into_items(self) -> Vec<Value> {
        self.items
    }
}

/// The API's timestamp format: RFC 3339, UTC spelled `Z`.
pub(super) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339)
        .expect("an OffsetDateTime always has the components RFC 3339 needs")
}

/// The instant the fake clock starts from when there is no data at all.
pub(super) fn empty_org_clock() -> OffsetDateTime {
    NOW
}

/// A random display name; duplicates with existing procedures are possible and welcome.
pub(super) fn random_name(rng: &mut StdRng) -> String {
    format!(
        "{}{} {}",
        pick(rng, QUALIFIERS),
        pick(rng, TOPICS),
        pick(rng, KINDS)
    )
}

/// One procedure; its calls name procedures from `known_names` other than itself.
pub(super) fn procedure(
    rng: &mut StdRng,
    id: &str,
    name: &str,
    at: OffsetDateTime,
    known_names: &[String],
) -> Value {
    let status = *[
        STATUSES[0],
        STATUSES[0],
        STATUSES[0],
        STATUSES[1],
        STATUSES[2],
    ]
    .choose(rng)
    .expect("non-empty");
    let owner = person(rng);
    // Performers are mostly teams, sometimes one named person.
    let performer = if rng.gen_bool(0.7) {
        format!("{} Team", pick(rng, DEPARTMENTS))
    } else {
        person(rng)
    };
    let lane_count = rng.gen_range(0..=4);
    let lanes: Vec<&str> = DEPARTMENTS
        .choose_multiple(rng, lane_count)
        .copied()
        .collect();
    let called_within = calls(rng, name, known_names);
    let called_from = calls(rng, name, known_names);
    json!({
        "id": id,
        "name": name,
        "status": status,
        "owner": owner,
        "performer": performer,
        "updated_at": rfc3339(at),
        "url": format!("https://demo.klarify.biz/process/{id}"),
        "lanes": lanes,
        "called_within": called_within,
        "called_from": called_from,
    })
}

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from.choose(rng).expect("lists are non-empty")
}

fn person(rng: &mut StdRng) -> String {
    format!("{} {}", pick(rng, FIRST_NAMES), pick(rng, LAST_NAMES))
}

/// Mostly distinct names (a numeric suffix separates repeats of a base name), but about
/// 3% deliberately copy an earlier name so that some names belong to exactly two procedures.
fn unique_ish_names(rng: &mut StdRng, n: usize) -> Vec<String> {
    let mut uses: HashMap<String, usize> = HashMap::new();
    let mut next_suffix: HashMap<String, usize> = HashMap::new();
    let mut names: Vec<String> = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 && rng.gen_bool(0.03) {
            let earlier = names[rng.gen_range(0..i)].clone();
            if uses[&earlier] == 1 {
                *uses.get_mut(&earlier).expect("counted") += 1;
                names.push(earlier);
                continue;
            }
        }
        let base = random_name(rng);
        let suffix = next_suffix.entry(base.clone()).or_insert(1);
        let name = if *suffix == 1 {
            base
        } else {
            format!("{base} {suffix}")
        };
        *suffix += 1;
        *uses.entry(name.clone()).or_insert(0) += 1;
        names.push(name);
    }
    // Small samples might roll no duplicate at all; tests of ambiguity need one.
    if n >= 3 && uses.values().all(|&count| count == 1) {
        names[n - 1] = names[n / 2].clone();
    }
    names
}

/// Whole seconds over the past year, with about a tenth of the items in three bulk edits.
fn spread_times(rng: &mut StdRng, n: usize) -> Vec<OffsetDateTime> {
    let bulk: Vec<OffsetDateTime> = (0..3)
        .map(|_| NOW - Duration::seconds(rng.gen_range(0..YEAR_SECS)))
        .collect();
    (0..n)
        .map(|_| {
            if rng.gen_bool(0.1) {
                *bulk.choose(rng).expect("three bulk instants")
            } else {
                NOW - Duration::seconds(rng.gen_range(0..YEAR_SECS))
            }
        })
        .collect()
}

/// 0-3 names, usually of other procedures, occasionally of none at all.
fn calls(rng: &mut StdRng, own_name: &str, known_names: &[String]) -> Vec<String> {
    let count = *[0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
        .choose(rng)
        .expect("non-empty");
    let mut out: Vec<String> = Vec::with_capacity(count);
    for _ in 0..count {
        let name = if rng.gen_bool(0.06) {
            Some(pick(rng, PHANTOMS).to_string())
        } else {
            // A few tries are plenty: only tiny organisations have few other names.
            (0..4)
                .filter_map(|_| known_names.choose(rng))
                .find(|name| *name != own_name)
                .cloned()
        };
        if let Some(name) = name.filter(|name| !out.contains(name)) {
            out.push(name);
        }
    }
    out
}

/// Chance might leave a small sample without an ambiguous or an unresolved call; put one
/// of each on the first procedure so every sample of a few items exercises both.
fn guarantee_call_traps(items: &mut [Value], names: &[String]) {
    let Some(first_name) = names.first() else {
        return;
    };
    // Ordered, so that which name gets used does not depend on hashing.
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for name in names {
        *counts.entry(name).or_insert(0) += 1;
    }
    let called = |item: &Value, relation: &str| -> Vec<String> {
        item[relation]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let all_calls: Vec<String> = items
        .iter()
        .flat_map(|item| [called(item, "called_within"), called(item, "called_from")])
        .flatten()
        .collect();
    let ambiguous = counts
        .iter()
        .find(|(name, count)| **count > 1 && **name != first_name.as_str())
        .map(|(name, _)| name.to_string());
    if let Some(ambiguous) = ambiguous {
        if !all_calls.iter().any(|c| counts.get(c.as_str()) > Some(&1)) {
            push_call(&mut items[0], "called_from", ambiguous);
        }
    }
    if !all_calls.iter().any(|c| !counts.contains_key(c.as_str())) {
        push_call(&mut items[0], "called_within", PHANTOMS[0].to_string());
    }
}

fn push_call(item: &mut Value, relation: &str, name: String) {
    if let Some(list) = item[relation].as_array_mut() {
        list.push(Value::String(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_of(items: &[Value]) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for item in items {
            *counts
                .entry(item["name"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let a = Organisation::generate(42, 200).into_items();
        let b = Organisation::generate(42, 200).into_items();
        let c = Organisation::generate(43, 200).into_items();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn items_have_exactly_the_documented_shape() {
        let org = Organisation::generate(7, 300);
        assert_eq!(org.len(), 300);
        for item in org.into_items() {
            let obj = item.as_object().unwrap();
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                [
                    "called_from",
                    "called_within",
                    "id",
                    "lanes",
                    "name",
                    "owner",
                    "performer",
                    "status",
                    "updated_at",
                    "url"
                ]
            );
            let id = item["id"].as_str().unwrap();
            assert_eq!(
                item["url"],
                format!("https://demo.klarify.biz/process/{id}")
            );
            assert!(STATUSES.contains(&item["status"].as_str().unwrap()));
            assert!(item["lanes"].as_array().unwrap().len() <= 4);
            let at = item["updated_at"].as_str().unwrap();
            assert!(at.ends_with('Z') && !at.contains('.'), "{at}");
            let parsed = OffsetDateTime::parse(at, &Rfc3339).unwrap();
            assert!(parsed <= NOW && parsed > NOW - Duration::seconds(YEAR_SECS));
        }
    }

    #[test]
    fn calls_include_ambiguous_and_unresolved_names_but_never_self() {
        for n in [5, 40, 500] {
            let items = Organisation::generate(3, n).into_items();
            let counts = names_of(&items);
            let (mut ambiguous, mut unresolved) = (0, 0);
            for item in &items {
                for rel in ["called_within", "called_from"] {
                    for called in item[rel].as_array().unwrap() {
                        let called = called.as_str().unwrap();
                        assert_ne!(Some(called), item["name"].as_str());
                        match counts.get(called) {
                            None => unresolved += 1,
                            Some(1) => {}
                            Some(_) => ambiguous += 1,
                        }
                    }
                }
            }
            assert!(ambiguous > 0 && unresolved > 0, "n={n}");
        }
    }

    #[test]
    fn tied_sample_shares_one_instant_and_otherwise_matches() {
        let plain = Organisation::generate(9, 50).into_items();
        let tied = Organisation::generate_tied(9, 50).into_items();
        let first = &tied[0]["updated_at"];
        assert!(tied.iter().all(|item| &item["updated_at"] == first));
        assert_eq!(plain[10]["name"], tied[10]["name"]);
    }

    #[test]
    fn grouped_sample_has_a_run_per_group() {
        let items = Organisation::generate_grouped(9, 50, &[10, 5]).into_items();
        let at = |k: usize| items[k]["updated_at"].as_str().unwrap().to_owned();
        assert!((0..10).all(|k| at(k) == at(0)));
        assert!((10..15).all(|k| at(k) == at(10)));
        assert_ne!(at(0), at(10));
        let rest: std::collections::HashSet<String> = (15..50).map(at).collect();
        assert!(!rest.contains(&at(0)) && !rest.contains(&at(10)));
    }

    #[test]
    fn ids_are_unique_numeric_strings() {
        let items = Organisation::generate(1, 1000).into_items();
        let mut ids: Vec<u64> = items
            .iter()
            .map(|i| i["id"].as_str().unwrap().parse().unwrap())
            .collect();
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        assert!(Organisation::generate(1, 0).is_empty());
    }
}
