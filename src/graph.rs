//! `klarify-sync graph` and the status page's map: the live procedures' call graph, read from
//! the mirror (`procedure_call_edges`) and drawn as Graphviz DOT or Mermaid text.
//!
//! Names come from the API, so every label is escaped for the language it lands in. An edge
//! runs from the caller to the procedure it calls, whichever list named it: `called_within`
//! (the parent includes this one as a sub-process) is drawn solid, `called_from` (a process or
//! global task calls this one) dashed. A name no live procedure has, or several have, is a node
//! of its own, drawn distinctly, so that the picture never claims a link the data does not hold.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write;

use crate::store::{CallEdge, GraphNode, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Graphviz: `dot -Tsvg` renders it.
    #[default]
    Dot,
    /// Mermaid: GitHub, GitLab and many wikis render it in a ```mermaid block.
    Mermaid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    Owner,
    Status,
}

/// What to draw and how.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub format: Format,
    /// Boxes around the procedures of one owner (or status).
    pub group_by: Option<GroupBy>,
    /// Only the procedures named so and those within `depth` calls of them, either way.
    pub around: Option<(String, usize)>,
    /// At most this many nodes (a neighbourhood is cut, and says so); `None`: no limit.
    pub max_nodes: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no live procedure is named {0:?} (names match exactly, case included)")]
    NoSuchName(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Relation {
    CalledWithin,
    CalledFrom,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Procedure,
    /// Several live procedures have the name: no edge can say which one is meant.
    Ambiguous {
        candidates: i64,
    },
    /// No live procedure has the name.
    Unresolved,
}

#[derive(Debug, Clone)]
struct Node {
    label: String,
    kind: Kind,
    /// The owner or status to box it with; procedures only.
    group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Edge {
    from: usize,
    to: usize,
    relation: Relation,
}

/// Procedures and the names they call, each once.
#[derive(Debug, Clone)]
pub struct Graph {
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    /// Said on the picture, e.g. that a neighbourhood was cut.
    note: Option<String>,
}

/// Reads the mirror and draws it as `options` say.
pub async fn draw(store: &Store, options: &Options) -> Result<String, GraphError> {
    let (nodes, edges) = store.call_graph().await?;
    let mut graph = Graph::build(&nodes, &edges, options.group_by);
    if let Some((name, depth)) = &options.around {
        graph = graph.around(name, *depth, options.max_nodes)?;
    } else if let Some(cap) = options.max_nodes {
        graph = graph.first(cap);
    }
    Ok(match options.format {
        Format::Dot => graph.to_dot(),
        Format::Mermaid => graph.to_mermaid(),
    })
}

impl Graph {
    pub fn build(procedures: &[GraphNode], calls: &[CallEdge], group_by: Option<GroupBy>) -> Self {
        let mut nodes: Vec<Node> = procedures
            .iter()
            .map(|p| Node {
                label: p
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{} (no name)", p.id)),
                kind: Kind::Procedure,
                group: group_by.map(|g| {
                    let (value, none) = match g {
                        GroupBy::Owner => (&p.owner, "(no owner)"),
                        GroupBy::Status => (&p.status, "(no status)"),
                    };
                    value.clone().unwrap_or_else(|| none.to_owned())
                }),
            })
            .collect();
        let index: HashMap<&str, usize> = procedures
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.as_str(), i))
            .collect();
        // Names that resolve to no single procedure, one node each.
        let mut names: HashMap<(&str, bool), usize> = HashMap::new();
        let mut seen = HashSet::new();
        let mut edges = Vec::new();
        for c in calls {
            let Some(&to) = index.get(c.procedure_id.as_str()) else {
                continue;
            };
            let from = match (c.resolution.as_str(), &c.related_procedure_id) {
                ("resolved", Some(id)) => match index.get(id.as_str()) {
                    Some(&i) => i,
                    None => continue,
                },
                (resolution, _) => {
                    let ambiguous = resolution == "ambiguous";
                    *names
                        .entry((c.related_name.as_str(), ambiguous))
                        .or_insert_with(|| {
                            nodes.push(Node {
                                label: c.related_name.clone(),
                                kind: if ambiguous {
                                    Kind::Ambiguous {
                                        candidates: c.candidates,
                                    }
                                } else {
                                    Kind::Unresolved
                                },
                                group: None,
                            });
                            nodes.len() - 1
                        })
                }
            };
            let relation = if c.relation == "called_within" {
                Relation::CalledWithin
            } else {
                Relation::CalledFrom
            };
            let edge = Edge { from, to, relation };
            if seen.insert(edge) {
                edges.push(edge);
            }
        }
        Self {
            nodes,
            edges,
            note: None,
        }
    }

    /// The procedures named `name` and every node within `depth` edges of them, followed either
    /// way. Names that resolve to no single procedure are shown but not followed: the procedures
    /// that merely mention the same name are not neighbours.
    fn around(self, name: &str, depth: usize, cap: Option<usize>) -> Result<Self, GraphError> {
        let cap = cap.unwrap_or(usize::MAX);
        let mut adjacent = vec![Vec::new(); self.nodes.len()];
        for e in &self.edges {
            adjacent[e.from].push(e.to);
            adjacent[e.to].push(e.from);
        }
        let mut distance: HashMap<usize, usize> = HashMap::new();
        let mut queue = VecDeque::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.kind == Kind::Procedure && n.label == name && distance.len() < cap {
                distance.insert(i, 0);
                queue.push_back(i);
            }
        }
        if distance.is_empty() {
            return Err(GraphError::NoSuchName(name.to_owned()));
        }
        let mut cut = false;
        while let Some(i) = queue.pop_front() {
            let d = distance[&i];
            if d == depth || self.nodes[i].kind != Kind::Procedure {
                continue;
            }
            for &j in &adjacent[i] {
                if distance.contains_key(&j) {
                    continue;
                }
                if distance.len() >= cap {
                    cut = true;
                    break;
                }
                distance.insert(j, d + 1);
                queue.push_back(j);
            }
        }
        let mut kept = self.keep(|i| distance.contains_key(&i));
        kept.note = Some(format!(
            "{name}: {depth} call(s) around{}",
            if cut {
                format!(", cut at {cap} nodes")
            } else {
                String::new()
            }
        ));
        Ok(kept)
    }

    /// The first `cap` nodes, for a whole mirror drawn within a bound.
    fn first(self, cap: usize) -> Self {
        if self.nodes.len() <= cap {
            return self;
        }
        let total = self.nodes.len();
        let mut kept = self.keep(|i| i < cap);
        kept.note = Some(format!("the first {cap} of {total} nodes"));
        kept
    }

    fn keep(self, keep: impl Fn(usize) -> bool) -> Self {
        let mut renumber = HashMap::new();
        let mut nodes = Vec::new();
        for (i, n) in self.nodes.into_iter().enumerate() {
            if keep(i) {
                renumber.insert(i, nodes.len());
                nodes.push(n);
            }
        }
        let edges = self
            .edges
            .iter()
            .filter_map(|e| {
                Some(Edge {
                    from: *renumber.get(&e.from)?,
                    to: *renumber.get(&e.to)?,
                    relation: e.relation,
                })
            })
            .collect();
        Self {
            nodes,
            edges,
            note: self.note,
        }
    }

    /// Node indexes by group, groups sorted; the ungrouped under `None`.
    fn groups(&self) -> BTreeMap<Option<&str>, Vec<usize>> {
        let mut groups: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            groups.entry(n.group.as_deref()).or_default().push(i);
        }
        groups
    }

    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "// Edges run from caller to called: solid, includes it as a sub-process (called_within);\n\
             // dashed, calls it (called_from). Dashed grey boxes: names no live procedure has;\n\
             // dotted orange: names several have.\n\
             digraph procedures {\n  graph [rankdir=LR, fontname=\"sans-serif\"",
        );
        if let Some(note) = &self.note {
            let _ = write!(out, ", label=\"{}\", labelloc=t", dot_escape(note));
        }
        out.push_str(
            "];\n  node [shape=box, style=rounded, fontname=\"sans-serif\"];\n  edge [color=\"#444444\"];\n",
        );
        self.write_body(&mut out, &DOT);
        out.push_str("}\n");
        out
    }

    pub fn to_mermaid(&self) -> String {
        let mut out = String::from(
            "%% Edges run from caller to called: solid, includes it as a sub-process (called_within);\n\
             %% dotted, calls it (called_from). Dashed grey: names no live procedure has; orange: names several have.\n\
             flowchart LR\n",
        );
        if let Some(note) = &self.note {
            let _ = writeln!(out, "  note[\"{}\"]:::note", mermaid_escape(note));
        }
        self.write_body(&mut out, &MERMAID);
        out.push_str(
            "  classDef ambiguous stroke:#d97706,stroke-dasharray:2 2\n  \
             classDef unresolved stroke:#888,color:#555,stroke-dasharray:5 5\n  \
             classDef note fill:none,stroke:none\n",
        );
        out
    }

    /// The groups with their nodes, then the edges.
    fn write_body(&self, out: &mut String, syntax: &Syntax) {
        for (k, (group, members)) in self.groups().into_iter().enumerate() {
            let indent = match group {
                Some(g) => {
                    out.push_str(&(syntax.group)(k, &(syntax.escape)(g)));
                    "    "
                }
                None => "  ",
            };
            for i in members {
                let n = &self.nodes[i];
                let mut label = (syntax.escape)(&n.label);
                match n.kind {
                    Kind::Procedure => {}
                    Kind::Ambiguous { candidates } => {
                        let _ = write!(
                            label,
                            "{}({candidates} procedures have this name)",
                            syntax.line_break
                        );
                    }
                    Kind::Unresolved => {
                        let _ = write!(
                            label,
                            "{}(no live procedure has this name)",
                            syntax.line_break
                        );
                    }
                }
                let _ = writeln!(out, "{indent}{}", (syntax.node)(i, &label, &n.kind));
            }
            if group.is_some() {
                out.push_str(syntax.group_end);
            }
        }
        for e in &self.edges {
            let _ = writeln!(out, "  {}", (syntax.edge)(e, &self.nodes[e.from].kind));
        }
    }
}

/// What differs between the two languages.
struct Syntax {
    escape: fn(&str) -> String,
    line_break: &'static str,
    /// The line opening group `k`, given its escaped label.
    group: fn(usize, &str) -> String,
    group_end: &'static str,
    /// Node `i`, given its escaped label.
    node: fn(usize, &str, &Kind) -> String,
    /// An edge, given the kind of the node it starts from.
    edge: fn(&Edge, &Kind) -> String,
}

static DOT: Syntax = Syntax {
    escape: dot_escape,
    line_break: "\\n",
    group: |k, label| format!("  subgraph cluster_{k} {{\n    label=\"{label}\";\n"),
    group_end: "  }\n",
    node: |i, label, kind| {
        let style = match kind {
            Kind::Procedure => "",
            Kind::Ambiguous { .. } => ", style=\"rounded,dotted\", color=darkorange",
            Kind::Unresolved => ", style=\"rounded,dashed\", color=grey50, fontcolor=grey30",
        };
        format!("n{i} [label=\"{label}\"{style}];")
    },
    edge: |e, from| {
        let mut attrs = Vec::new();
        if e.relation == Relation::CalledFrom {
            attrs.push("style=dashed");
        }
        match from {
            Kind::Procedure => {}
            Kind::Ambiguous { .. } => attrs.push("color=darkorange"),
            Kind::Unresolved => attrs.push("color=grey50"),
        }
        if attrs.is_empty() {
            format!("n{} -> n{};", e.from, e.to)
        } else {
            format!("n{} -> n{} [{}];", e.from, e.to, attrs.join(", "))
        }
    },
};

static MERMAID: Syntax = Syntax {
    escape: mermaid_escape,
    line_break: "<br/>",
    group: |k, label| format!("  subgraph g{k}[\"{label}\"]\n"),
    group_end: "  end\n",
    node: |i, label, kind| {
        let class = match kind {
            Kind::Procedure => "",
            Kind::Ambiguous { .. } => ":::ambiguous",
            Kind::Unresolved => ":::unresolved",
        };
        format!("n{i}[\"{label}\"]{class}")
    },
    edge: |e, _| {
        let arrow = match e.relation {
            Relation::CalledWithin => "-->",
            Relation::CalledFrom => "-.->",
        };
        format!("n{} {arrow} n{}", e.from, e.to)
    },
};

/// The text of a DOT double-quoted string: quotes and backslashes escaped (a backslash would
/// start one of DOT's label escapes), line breaks as DOT's `\n`.
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The text of a Mermaid `["..."]` label: Mermaid has no backslash escapes, only its entity
/// codes (`#35;`), and reads markup and its own punctuation inside labels, so every ASCII
/// character but letters, digits, spaces and harmless punctuation becomes one.
fn mermaid_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("<br/>"),
            c if c.is_control() => out.push(' '),
            c if c.is_alphanumeric() || " .,-_:/()'!?+=@".contains(c) || !c.is_ascii() => {
                out.push(c)
            }
            c => {
                let _ = write!(out, "#{};", u32::from(c));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(id: &str, name: &str, owner: Option<&str>) -> GraphNode {
        GraphNode {
            id: id.into(),
            name: Some(name.into()),
            status: Some("published".into()),
            owner: owner.map(Into::into),
        }
    }

    fn call(to: &str, relation: &str, name: &str, resolved: Option<&str>, n: i64) -> CallEdge {
        CallEdge {
            procedure_id: to.into(),
            relation: relation.into(),
            related_name: name.into(),
            related_procedure_id: resolved.map(Into::into),
            resolution: match n {
                0 => "unresolved",
                1 => "resolved",
                _ => "ambiguous",
            }
            .into(),
            candidates: n,
        }
    }

    /// a -> b -> c -> d in a chain, b also named twice by c, and names that resolve to nothing
    /// or to two procedures.
    fn sample() -> Graph {
        let procs = [
            proc("1", "a", Some("Ann")),
            proc("2", "b", Some("Ann")),
            proc("3", "c", None),
            proc("4", "d", Some("Bo")),
        ];
        let calls = [
            call("2", "called_within", "a", Some("1"), 1),
            call("3", "called_from", "b", Some("2"), 1),
            call("3", "called_from", "b", Some("2"), 1),
            call("4", "called_within", "c", Some("3"), 1),
            call("1", "called_within", "Ghost", None, 0),
            call("1", "called_from", "Twin", None, 2),
            call("9", "called_within", "a", Some("1"), 1),
        ];
        Graph::build(&procs, &calls, None)
    }

    #[test]
    fn each_procedure_and_edge_once_and_unresolved_names_distinct() {
        let dot = sample().to_dot();
        for (name, n) in [("a", 0), ("b", 1), ("c", 2), ("d", 3)] {
            assert_eq!(dot.matches(&format!("n{n} [label=\"{name}\"]")).count(), 1);
        }
        assert_eq!(dot.matches("n1 -> n2 [style=dashed];").count(), 1, "{dot}");
        assert_eq!(dot.matches(" -> ").count(), 5, "{dot}");
        assert!(
            dot.contains("Ghost\\n(no live procedure has this name)\", style=\"rounded,dashed\"")
        );
        assert!(dot.contains("Twin\\n(2 procedures have this name)\", style=\"rounded,dotted\""));
        assert!(dot.contains("n5 -> n0 [style=dashed, color=darkorange];"));
    }

    #[test]
    fn dot_and_mermaid_escape_quotes_backslashes_newlines_and_markup() {
        let hostile = "say \"hi\"\\n\nnext <b>#1;</b> [x] end";
        let g = Graph::build(
            &[proc("1", hostile, Some("O\"wner"))],
            &[],
            Some(GroupBy::Owner),
        );
        let dot = g.to_dot();
        assert!(
            dot.contains(r#"n0 [label="say \"hi\"\\n\nnext <b>#1;</b> [x] end"];"#),
            "{dot}"
        );
        assert!(dot.contains(r#"label="O\"wner";"#), "{dot}");
        let mermaid = g.to_mermaid();
        assert!(
            mermaid.contains(
                "n0[\"say #34;hi#34;#92;n<br/>next #60;b#62;#35;1#59;#60;/b#62; #91;x#93; end\"]"
            ),
            "{mermaid}"
        );
        assert!(mermaid.contains("subgraph g0[\"O#34;wner\"]"), "{mermaid}");
        let label_lines = mermaid.lines().filter(|l| l.contains("n0[")).count();
        assert_eq!(label_lines, 1, "a newline in a name must not end the line");
    }

    #[test]
    fn grouping_boxes_procedures_and_leaves_names_outside() {
        let procs = [proc("1", "a", Some("Ann")), proc("2", "b", None)];
        let calls = [call("1", "called_within", "Ghost", None, 0)];
        let dot = Graph::build(&procs, &calls, Some(GroupBy::Owner)).to_dot();
        assert!(
            dot.contains("subgraph cluster_2 {\n    label=\"Ann\";\n    n0 [label=\"a\"];\n  }"),
            "{dot}"
        );
        assert!(
            dot.contains("label=\"(no owner)\";\n    n1 [label=\"b\"];"),
            "{dot}"
        );
        assert!(dot.contains("\n  n2 [label=\"Ghost"), "{dot}");
        let mermaid = Graph::build(&procs, &calls, Some(GroupBy::Owner)).to_mermaid();
        assert!(
            mermaid.contains("  subgraph g2[\"Ann\"]\n    n0[\"a\"]\n  end\n"),
            "{mermaid}"
        );
    }

    #[test]
    fn around_follows_calls_both_ways_up_to_depth_and_not_through_names() {
        let g = sample().around("b", 1, None).unwrap();
        let labels: Vec<&str> = g.nodes.iter().map(|n| n.label.as_str()).collect();
        assert_eq!(labels, ["a", "b", "c"]);
        assert_eq!(g.edges.len(), 2);
        let g = sample().around("a", 1, None).unwrap();
        let labels: Vec<&str> = g.nodes.iter().map(|n| n.label.as_str()).collect();
        assert_eq!(labels, ["a", "b", "Ghost", "Twin"]);
        let g = sample().around("a", 3, Some(3)).unwrap();
        assert_eq!(g.nodes.len(), 3);
        assert!(g.to_dot().contains("cut at 3 nodes"));
        assert!(matches!(
            sample().around("nobody", 2, None),
            Err(GraphError::NoSuchName(_))
        ));
    }

    #[test]
    fn mermaid_draws_called_from_dotted() {
        let m = sample().to_mermaid();
        assert!(m.contains("  n0 --> n1\n"), "{m}");
        assert!(m.contains("  n1 -.-> n2\n"), "{m}");
        assert_eq!(m.matches("-->").count() + m.matches("-.->").count(), 5);
    }
}
