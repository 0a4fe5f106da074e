//! One test per case of [`super::plan`] (the same cases the process test drives through real daemons).

use std::collections::HashSet;

use kiln_binpack::Demand;
use kiln_model::capacity::Resources;
use kiln_model::node::{CapacityReport, GpuReport, Heartbeat, HostReport, NodeStream};
use kiln_model::{Backend, Policy, StreamRequest, StreamState};

use super::*;

const NOW: u64 = 1_000_000;
const GRACE: u64 = 3_000;

fn ctx(warming: bool) -> Context {
    Context {
        epoch: 9,
        now_ms: NOW,
        grace_ms: GRACE,
        warming,
        relieve: Some(RELIEF_AFTER_MS),
    }
}

fn gpu(index: u32) -> GpuReport {
    GpuReport {
        index,
        model: "L4".into(),
        uuid: format!("GPU-{index}"),
        pci_bus_id: None,
        profile: None,
        nvenc: true,
        nvdec: true,
        capacity: Resources::default(),
        allocated: Resources::default(),
        free: Resources::default(),
        measured: None,
    }
}

fn copy(id: &str, state: StreamState, backend: Backend) -> NodeStream {
    NodeStream {
        id: id.into(),
        state,
        backend,
        decode_gpu: None,
        demand: Resources::default(),
        gpu_demand: None,
        behind_real_time: false,
        has_segment: true,
    }
}

fn running(id: &str) -> NodeStream {
    copy(id, StreamState::Running, Backend::Cpu)
}

/// A live node with NVML indices `gpus` that reports `streams`.
fn live(id: &str, gpus: &[u32], streams: Vec<NodeStream>) -> NodeEntry {
    NodeEntry {
        id: id.into(),
        heartbeat: Some(Heartbeat {
            url: format!("http://{id}"),
            capacity: CapacityReport {
                node_id: id.into(),
                epoch: 1,
                fence_epoch: 0,
                host: HostReport::default(),
                gpus: gpus.iter().copied().map(gpu).collect(),
                gpu_inventory: Default::default(),
                streams,
                headroom: Default::default(),
                demands: Default::default(),
                vod: None,
                draining: false,
            },
        }),
        draining: false,
        evacuate: false,
    }
}

fn dead(id: &str) -> NodeEntry {
    NodeEntry {
        id: id.into(),
        heartbeat: None,
        draining: false,
        evacuate: false,
    }
}

fn nvenc_demand() -> Demand {
    Demand {
        host: Resources {
            cpu_millicores: 100,
            ..Default::default()
        },
        gpu: Some(Resources {
            nvenc_fps: 60,
            ..Default::default()
        }),
        pixel_rate: 1,
    }
}

fn x264_demand() -> Demand {
    Demand {
        host: Resources {
            cpu_millicores: 1200,
            ..Default::default()
        },
        gpu: None,
        pixel_rate: 1,
    }
}

fn pending(id: &str) -> StreamRecord {
    StreamRecord {
        id: id.into(),
        request: StreamRequest {
            source: "test:".into(),
            preset: Some("live-720p-abr".into()),
            ..Default::default()
        },
        phase: Phase::Pending,
        node: None,
        gpu: None,
        demand: None,
        alternatives: vec![nvenc_demand(), x264_demand()],
        epoch: 2,
        created_unix_ms: 1,
        placed_unix_ms: 0,
        moves: 0,
        handover_from: None,
    }
}

/// Placed on `node` with the x264 alternative, long enough ago that a missing copy counts as lost.
fn placed(id: &str, node: &str) -> StreamRecord {
    StreamRecord {
        phase: Phase::Placed,
        node: Some(node.into()),
        demand: Some(x264_demand()),
        placed_unix_ms: NOW - GRACE - 1,
        moves: 1,
        ..pending(id)
    }
}

fn plan_of(
    records: &[StreamRecord],
    nodes: &[NodeEntry],
    known_dead: &[&str],
    warming: bool,
) -> Vec<Action> {
    let known: HashSet<String> = known_dead.iter().map(|s| s.to_string()).collect();
    plan(records, &Fleet::from_nodes(nodes), &known, &ctx(warming))
}

fn stray(stream: &str, node: &str) -> Action {
    Action::StopStray {
        stream: stream.into(),
        node: node.into(),
        url: format!("http://{node}"),
    }
}

#[test]
fn a_dead_nodes_streams_are_re_placed_as_one_batch_with_their_moves_counted() {
    let nodes = [live("a", &[], vec![running("s0")]), dead("b")];
    let records = [placed("s0", "a"), placed("s1", "b"), placed("s2", "b")];
    let actions = plan_of(&records, &nodes, &[], false);
    let expect = |id: &str| Action::Replace {
        record: StreamRecord {
            moves: 2,
            ..released(placed(id, "b"))
        },
        moved: true,
    };
    assert_eq!(
        actions,
        vec![
            Action::NodeDied { node: "b".into() },
            expect("s1"),
            expect("s2"),
        ],
        "s0 runs where it is placed: nothing to do"
    );
    let Action::Replace { record, .. } = &actions[1] else {
        unreachable!()
    };
    assert_eq!(
        (record.phase, &record.node, record.gpu, record.demand),
        (Phase::Pending, &None, None, None),
        "a re-placed record books nothing until the batch places it"
    );
}

#[test]
fn a_death_is_declared_once_and_a_node_that_reports_again_is_forgotten() {
    let nodes = [live("a", &[], vec![]), dead("b")];
    assert_eq!(
        plan_of(&[], &nodes, &["a", "b"], false),
        vec![Action::NodeBack { node: "a".into() }],
        "b was counted already; a reports again"
    );
    assert_eq!(plan_of(&[], &nodes, &["b"], false), vec![]);
}

#[test]
fn while_warming_no_node_dies_and_records_on_silent_nodes_stay_but_pending_ones_are_retried() {
    let nodes = [live("a", &[], vec![]), dead("b")];
    let records = [placed("s1", "b"), pending("s2")];
    assert_eq!(
        plan_of(&records, &nodes, &["a"], true),
        vec![Action::Replace {
            record: released(pending("s2")),
            moved: false
        }],
        "no death, no revival, s1 left alone"
    );
    // once warm, the same situation declares b dead and moves s1
    let warm = plan_of(&records, &nodes, &["a"], false);
    assert_eq!(warm.len(), 4, "{warm:?}");
    assert!(warm.contains(&Action::NodeDied { node: "b".into() }));
    assert!(warm.contains(&Action::NodeBack { node: "a".into() }));
    assert!(matches!(&warm[2], Action::Replace { record, moved: true } if record.id == "s1"));
}

#[test]
fn a_running_copy_of_a_pending_record_is_adopted_on_its_gpu_with_the_nvenc_alternative() {
    // NVML indices 3 and 7: records book the position in the report, so GPU 7 is position 1
    let nodes = [live(
        "a",
        &[3, 7],
        vec![copy("s1", StreamState::Starting, Backend::Nvenc { gpu: 7 })],
    )];
    assert_eq!(
        plan_of(&[pending("s1")], &nodes, &[], false),
        vec![Action::Adopt {
            record: StreamRecord {
                phase: Phase::Placed,
                node: Some("a".into()),
                gpu: Some(1),
                demand: Some(nvenc_demand()),
                epoch: 9,
                placed_unix_ms: NOW,
                ..pending("s1")
            }
        }]
    );
}

#[test]
fn an_nvenc_copy_on_a_gpu_the_report_does_not_list_is_adopted_without_a_gpu() {
    let nodes = [live(
        "a",
        &[0],
        vec![copy("s1", StreamState::Running, Backend::Nvenc { gpu: 5 })],
    )];
    let actions = plan_of(&[pending("s1")], &nodes, &[], false);
    let [Action::Adopt { record }] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(record.gpu, None);
    assert_eq!(record.demand, Some(nvenc_demand()), "it encodes on NVENC");
}

#[test]
fn a_copy_of_a_record_whose_node_died_is_adopted_where_it_runs_instead_of_moving() {
    let nodes = [live("a", &[0], vec![running("s1")]), dead("b")];
    let actions = plan_of(&[placed("s1", "b")], &nodes, &["b"], false);
    assert_eq!(
        actions,
        vec![Action::Adopt {
            record: StreamRecord {
                node: Some("a".into()),
                gpu: None,
                demand: Some(x264_demand()),
                epoch: 9,
                placed_unix_ms: NOW,
                ..placed("s1", "b")
            }
        }],
        "CPU copy: the x264 alternative, moves unchanged, nothing re-placed"
    );
}

#[test]
fn a_copy_elsewhere_is_adopted_when_the_records_live_node_lost_it() {
    let nodes = [live("a", &[], vec![]), live("c", &[], vec![running("s1")])];
    let actions = plan_of(&[placed("s1", "a")], &nodes, &[], false);
    assert!(
        matches!(&actions[..], [Action::Adopt { record }] if record.node.as_deref() == Some("c")),
        "adopted on c, not restarted on a: {actions:?}"
    );
}

#[test]
fn copies_other_than_the_kept_one_are_stopped_before_the_kept_one_is_adopted() {
    let nodes = [
        live("a", &[], vec![running("s1"), running("s2")]),
        live("b", &[], vec![running("s1"), running("s2")]),
        live("c", &[], vec![running("s1")]),
    ];
    // placed on b, which runs it: b's copy is kept, a's and c's are strays
    assert_eq!(
        plan_of(&[placed("s1", "b")], &nodes, &[], false),
        vec![stray("s1", "a"), stray("s1", "c")]
    );
    // pending: the first copy (node order) is kept and adopted, the other is stopped first
    let actions = plan_of(&[pending("s2")], &nodes, &[], false);
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert_eq!(actions[0], stray("s2", "b"));
    assert!(matches!(&actions[1], Action::Adopt { record } if record.node.as_deref() == Some("a")));
}

#[test]
fn a_stream_its_live_node_lost_is_started_there_again_after_the_grace_period_only() {
    let nodes = [live("a", &[], vec![])];
    let lost = placed("s1", "a");
    assert_eq!(
        plan_of(std::slice::from_ref(&lost), &nodes, &[], false),
        vec![Action::Restart {
            record: lost.clone(),
            url: "http://a".into(),
            spec: Box::new(StreamRequest {
                policy: Some(Policy::CpuOnly),
                ..lost.request.clone()
            }),
        }],
        "an x264 booking is restarted pinned to the CPU"
    );
    // exactly at the end of the grace period: the report may still lag
    let fresh = StreamRecord {
        placed_unix_ms: NOW - GRACE,
        ..lost.clone()
    };
    assert_eq!(plan_of(&[fresh], &nodes, &[], false), vec![]);
    // the grace applies while warming too, and a lost stream is restarted while warming
    assert_eq!(
        plan_of(std::slice::from_ref(&lost), &nodes, &[], true).len(),
        1
    );
    // with no booking recorded, the request goes as it was asked
    let unbooked = StreamRecord {
        demand: None,
        ..lost
    };
    assert!(matches!(
        &plan_of(std::slice::from_ref(&unbooked), &nodes, &[], false)[..],
        [Action::Restart { spec, .. }] if **spec == unbooked.request
    ));
}

#[test]
fn pending_records_without_a_copy_are_retried_without_counting_a_move() {
    let nodes = [live("a", &[], vec![])];
    let pending_on_live = StreamRecord {
        node: Some("a".into()),
        ..pending("s2")
    };
    assert_eq!(
        plan_of(
            &[pending("s1"), pending_on_live.clone()],
            &nodes,
            &[],
            false
        ),
        vec![
            Action::Replace {
                record: released(pending("s1")),
                moved: false
            },
            Action::Replace {
                record: released(pending_on_live),
                moved: false
            },
        ]
    );
}

#[test]
fn ended_and_stopping_copies_are_ignored() {
    let nodes = [
        live(
            "a",
            &[],
            vec![
                copy("s1", StreamState::Ended, Backend::Cpu),
                copy("s2", StreamState::Stopping, Backend::Cpu),
            ],
        ),
        live(
            "c",
            &[],
            vec![copy("s1", StreamState::Stopping, Backend::Cpu)],
        ),
        dead("b"),
    ];
    let actions = plan_of(
        &[placed("s1", "b"), placed("s2", "a")],
        &nodes,
        &["b"],
        false,
    );
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(
        matches!(&actions[0], Action::Replace { record, moved: true } if record.id == "s1"),
        "s1's copies are on their way out: neither adopted nor stopped, it is re-placed"
    );
    assert!(
        matches!(&actions[1], Action::Restart { record, .. } if record.id == "s2"),
        "a stopping copy on its own node does not count as running it"
    );
    // failed copies still count (the daemon keeps them until told otherwise)
    let failed = [live(
        "a",
        &[],
        vec![copy("s3", StreamState::Failed, Backend::Cpu)],
    )];
    assert!(plan_of(&[placed("s3", "a")], &failed, &[], false).is_empty());
}

#[test]
fn the_fleet_lists_live_and_silent_nodes_and_copies_in_node_order() {
    let nodes = [
        live("a", &[], vec![running("s1")]),
        dead("b"),
        live(
            "c",
            &[],
            vec![running("s1"), copy("s2", StreamState::Ended, Backend::Cpu)],
        ),
    ];
    let f = Fleet::from_nodes(&nodes);
    assert_eq!(f.alive.keys().copied().collect::<Vec<_>>(), ["a", "c"]);
    assert_eq!(f.alive["c"], "http://c");
    assert_eq!(f.silent, ["b"]);
    let s1: Vec<_> = f.copies["s1"].iter().map(|c| (c.node, c.url)).collect();
    assert_eq!(s1, [("a", "http://a"), ("c", "http://c")]);
    assert!(!f.copies.contains_key("s2"), "an ended copy is not running");
}

/// A live node that drains itself (the daemon reports `draining` after SIGTERM) and reports `streams`.
fn draining(id: &str, streams: Vec<NodeStream>) -> NodeEntry {
    let mut n = live(id, &[], streams);
    if let Some(hb) = n.heartbeat.as_mut() {
        hb.capacity.draining = true;
    }
    n
}

#[test]
fn an_evacuating_nodes_streams_move_make_before_break() {
    // the daemon drains itself: its stream is placed elsewhere while the copy here plays on
    let nodes = [draining("a", vec![running("s1")]), live("b", &[], vec![])];
    let s1 = placed("s1", "a");
    assert_eq!(
        plan_of(std::slice::from_ref(&s1), &nodes, &[], false),
        vec![Action::Evacuate {
            record: StreamRecord {
                handover_from: Some("a".into()),
                ..s1.clone()
            }
        }]
    );
    // an operator's `drain?evacuate=true` does the same; a plain drain keeps the stream where it is
    let mut by_hand = live("a", &[], vec![running("s1")]);
    by_hand.draining = true;
    assert!(plan_of(
        std::slice::from_ref(&s1),
        &[by_hand.clone(), live("b", &[], vec![])],
        &[],
        false
    )
    .is_empty());
    by_hand.evacuate = true;
    assert!(matches!(
        plan_of(
            std::slice::from_ref(&s1),
            &[by_hand, live("b", &[], vec![])],
            &[],
            false
        )[..],
        [Action::Evacuate { .. }]
    ));

    // moved to b: while b's copy starts, nothing happens (the old copy is neither a stray nor adopted)
    let moving = StreamRecord {
        handover_from: Some("a".into()),
        ..placed("s1", "b")
    };
    let starting = [
        draining("a", vec![running("s1")]),
        live(
            "b",
            &[],
            vec![copy("s1", StreamState::Starting, Backend::Cpu)],
        ),
    ];
    assert!(plan_of(std::slice::from_ref(&moving), &starting, &[], false).is_empty());
    // b publishes parts but has no whole segment yet: viewers sent there could find a hole, so still nothing
    let first_parts = [
        draining("a", vec![running("s1")]),
        live(
            "b",
            &[],
            vec![NodeStream {
                has_segment: false,
                ..running("s1")
            }],
        ),
    ];
    assert!(plan_of(std::slice::from_ref(&moving), &first_parts, &[], false).is_empty());
    // b has a whole segment: the old copy is stopped and the move recorded as over
    let publishing = [
        draining("a", vec![running("s1")]),
        live("b", &[], vec![running("s1")]),
    ];
    assert_eq!(
        plan_of(std::slice::from_ref(&moving), &publishing, &[], false),
        vec![Action::Handover {
            record: StreamRecord {
                handover_from: None,
                ..moving.clone()
            },
            stop: vec![("a".into(), "http://a".into())],
        }]
    );
    // b never started it (past the grace period): started there again, the old copy still plays
    let missing = [draining("a", vec![running("s1")]), live("b", &[], vec![])];
    assert!(matches!(
        plan_of(std::slice::from_ref(&moving), &missing, &[], false)[..],
        [Action::Restart { ref url, .. }] if url == "http://b"
    ));
    // b died before the handover: the old copy is adopted again (and, its node still draining, moved again later)
    let b_dead = [draining("a", vec![running("s1")]), dead("b")];
    let actions = plan_of(&[moving], &b_dead, &["b"], false);
    assert!(
        matches!(&actions[..], [Action::Adopt { record }] if record.node.as_deref() == Some("a") && record.handover_from.is_none()),
        "{actions:?}"
    );
}

#[test]
fn a_move_that_cannot_finish_keeps_the_old_copy_and_a_publisher_is_not_moved() {
    let moving = StreamRecord {
        handover_from: Some("a".into()),
        ..placed("s1", "b")
    };
    let undo = |b_copy: Option<NodeStream>, r: &StreamRecord| {
        let nodes = [
            draining("a", vec![running("s1")]),
            live("b", &[], b_copy.into_iter().collect()),
        ];
        plan_of(std::slice::from_ref(r), &nodes, &[], false)
    };
    // the new copy failed: it is stopped, the old one adopted back (moved again on a later pass)
    let actions = undo(Some(copy("s1", StreamState::Failed, Backend::Cpu)), &moving);
    assert!(
        matches!(&actions[..], [Action::StopStray { node, .. }, Action::Adopt { record }]
            if node == "b" && record.node.as_deref() == Some("a") && record.handover_from.is_none()),
        "{actions:?}"
    );
    // still starting past the limit: the same
    let late = StreamRecord {
        placed_unix_ms: NOW - HANDOVER_LIMIT_MS - 1,
        ..moving.clone()
    };
    let actions = undo(Some(copy("s1", StreamState::Starting, Backend::Cpu)), &late);
    assert!(
        matches!(
            &actions[..],
            [Action::StopStray { .. }, Action::Adopt { .. }]
        ),
        "{actions:?}"
    );
    // within the limit, starting: wait
    let fresh = StreamRecord {
        placed_unix_ms: NOW,
        ..moving.clone()
    };
    assert!(undo(
        Some(copy("s1", StreamState::Starting, Backend::Cpu)),
        &fresh
    )
    .is_empty());
    // the new node is silent just after a new lease: wait, do not undo the move
    let nodes = [draining("a", vec![running("s1")]), dead("b")];
    assert!(plan_of(std::slice::from_ref(&moving), &nodes, &[], true).is_empty());
    // a `publish:` stream stays on its draining node: its publisher is connected there
    let mut publish = placed("p1", "a");
    publish.request.source = "publish:".into();
    let nodes = [draining("a", vec![running("p1")]), live("b", &[], vec![])];
    assert!(plan_of(&[publish], &nodes, &[], false).is_empty());
}

#[test]
fn a_stream_behind_real_time_is_moved_one_per_node_and_not_bounced() {
    let behind = |id: &str| NodeStream {
        behind_real_time: true,
        ..running(id)
    };
    let nodes = [
        live("a", &[], vec![behind("s1"), behind("s2")]),
        live("b", &[], vec![]),
    ];
    let old = |id: &str| StreamRecord {
        placed_unix_ms: NOW - RELIEF_AFTER_MS - 1,
        ..placed(id, "a")
    };
    // two streams behind on one node: one moves this pass (that may be enough for the other)
    let actions = plan_of(&[old("s1"), old("s2")], &nodes, &[], false);
    assert_eq!(
        actions,
        vec![Action::Relieve {
            record: StreamRecord {
                handover_from: Some("a".into()),
                ..old("s1")
            }
        }]
    );
    // placed there within the last minute: its window may describe its old node; not moved again yet
    let recent = StreamRecord {
        placed_unix_ms: NOW - 1_000,
        ..placed("s1", "a")
    };
    assert!(plan_of(std::slice::from_ref(&recent), &nodes, &[], false).is_empty());
    // nor while the lease is new, nor when it keeps real time
    assert!(plan_of(&[old("s1")], &nodes, &[], true).is_empty());
    let fine = [live("a", &[], vec![running("s1")]), live("b", &[], vec![])];
    assert!(plan_of(&[old("s1")], &fine, &[], false).is_empty());
    // and not at all without --relieve-behind
    let off = Context {
        relieve: None,
        ..ctx(false)
    };
    assert!(plan(
        &[old("s1")],
        &Fleet::from_nodes(&nodes),
        &HashSet::new(),
        &off
    )
    .is_empty());
}

#[test]
fn copies_of_removed_streams_are_stopped_and_the_removal_is_forgotten_once_none_is_left() {
    let nodes = [
        live("a", &[], vec![running("gone"), running("again")]),
        live("b", &[], vec![running("gone")]),
    ];
    let fleet = Fleet::from_nodes(&nodes);
    let removed: HashMap<String, u64> = [
        // deleted: its copy on a (the move's old node) and on b are both stopped
        ("gone".to_string(), NOW - 1),
        // placed again under the same id since: not a removed stream
        ("again".to_string(), NOW - 1),
        // no copy anywhere: remembered for a while, then forgotten
        ("quiet".to_string(), NOW - 1),
        ("old".to_string(), NOW - REMOVED_KEEP_MS - 1),
    ]
    .into_iter()
    .collect();
    let records = [placed("again", "a")];
    let out = removed_copies(&removed, &records, &fleet, &ctx(false));
    // "gone" was removed 1 ms ago: a report from before the delete may still list it
    assert!(out.stop.is_empty(), "{out:?}");
    assert_eq!(out.forget, vec!["old".to_string()]);
    // past the grace period its copies are stopped, and the removal is kept from this report on
    let later = Context {
        now_ms: NOW + GRACE,
        ..ctx(false)
    };
    let out = removed_copies(&removed, &records, &fleet, &later);
    assert_eq!(out.stop, vec![stray("gone", "a"), stray("gone", "b")]);
    assert_eq!(out.seen, vec!["gone".to_string()]);
}

#[test]
fn a_node_silent_for_a_day_with_nothing_on_it_is_forgotten() {
    let nodes = [
        dead("old"),
        dead("old-with-stream"),
        dead("old-moved-from"),
        dead("recent"),
        dead("unclocked"),
        live("alive", &[], vec![]),
    ];
    let fleet = Fleet::from_nodes(&nodes);
    let day = FORGET_NODE_AFTER_MS;
    let now = 3 * day;
    let seen: HashMap<String, u64> = [
        ("old", now - day - 1),
        ("old-with-stream", now - day - 1),
        ("old-moved-from", now - day - 1),
        ("recent", now - day + 1),
        ("alive", now - day - 1),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect();
    let moving = StreamRecord {
        handover_from: Some("old-moved-from".into()),
        ..placed("m", "alive")
    };
    let records = [pending("p"), placed("s", "old-with-stream"), moving];
    let (forget, unclocked) = forgotten(&fleet, &records, &seen, now);
    assert_eq!(forget, ["old"]);
    assert_eq!(unclocked, ["unclocked"]);
}
