//! Watermark tests in the form "nothing yet, then exactly this".

use super::*;

const IDLE: i64 = 10_000;

#[test]
fn bounded_out_of_orderness_trails_the_max_by_the_delay() {
    let mut g = BoundedOutOfOrderness::new(5_000);
    assert_eq!(g.current(), None, "nothing seen yet");
    g.observe(100_000);
    assert_eq!(g.current(), Some(95_000));
    g.observe(90_000); // out of order: does not move it back
    assert_eq!(g.current(), Some(95_000));
    g.observe(101_000);
    assert_eq!(g.current(), Some(96_000));
}

#[test]
fn source_watermark_is_the_minimum_over_partitions() {
    let mut w = PartitionWatermarks::new(2, 1_000, IDLE, 0);
    w.observe(0, 50_000, 0);
    assert_eq!(w.poll(0), None, "partition 1 has not spoken yet: nothing");
    w.observe(1, 20_000, 0);
    assert_eq!(w.poll(0), Some(Watermark::EventTime(19_000)));
    assert_eq!(w.poll(0), None, "unchanged: nothing");
    w.observe(1, 80_000, 1);
    assert_eq!(w.poll(1), Some(Watermark::EventTime(49_000)));
}

#[test]
fn an_idle_partition_stops_holding_the_watermark_back() {
    let mut w = PartitionWatermarks::new(2, 0, IDLE, 0);
    w.observe(0, 10_000, 0);
    w.observe(1, 5_000, 0);
    assert_eq!(w.poll(0), Some(Watermark::EventTime(5_000)));
    // partition 0 keeps talking, partition 1 falls silent
    w.observe(0, 30_000, 9_999);
    assert_eq!(w.poll(9_999), None, "partition 1 not idle yet: still 5000");
    assert_eq!(
        w.poll(10_000),
        Some(Watermark::EventTime(30_000)),
        "partition 1 idle"
    );
    // partition 1 comes back with old data: the watermark does not go back
    w.observe(1, 7_000, 10_500);
    assert_eq!(w.poll(10_500), None);
    w.observe(1, 40_000, 10_600);
    w.observe(0, 45_000, 10_600);
    assert_eq!(w.poll(10_600), Some(Watermark::EventTime(40_000)));
}

#[test]
fn a_partition_that_never_spoke_is_idle_after_the_timeout() {
    let mut w = PartitionWatermarks::new(2, 0, IDLE, 1_000);
    w.observe(0, 10_000, 1_000);
    assert_eq!(
        w.poll(1_000),
        None,
        "partition 1 silent, not yet idle: nothing"
    );
    w.observe(0, 12_000, 10_500);
    assert_eq!(w.poll(10_999), None);
    assert_eq!(w.poll(11_000), Some(Watermark::EventTime(12_000)));
}

#[test]
fn all_partitions_idle_makes_the_source_idle_then_active_again() {
    let mut w = PartitionWatermarks::new(1, 0, IDLE, 0);
    w.observe(0, 10_000, 0);
    assert_eq!(w.poll(0), Some(Watermark::EventTime(10_000)));
    assert_eq!(w.poll(IDLE), Some(Watermark::Idle));
    assert_eq!(w.poll(IDLE + 1), None, "still idle: nothing new");
    w.observe(0, 10_000, IDLE + 2);
    assert_eq!(
        w.poll(IDLE + 2),
        Some(Watermark::EventTime(10_000)),
        "active again, same time: re-announced"
    );
}

#[test]
fn finished_partitions_are_excluded_and_all_finished_closes_everything() {
    let mut w = PartitionWatermarks::new(2, 0, IDLE, 0);
    w.observe(0, 10_000, 0);
    w.observe(1, 3_000, 0);
    assert_eq!(w.poll(0), Some(Watermark::EventTime(3_000)));
    w.finish(1);
    assert_eq!(w.poll(0), Some(Watermark::EventTime(10_000)));
    w.finish(0);
    assert!(w.all_finished());
    assert_eq!(w.poll(0), Some(Watermark::EventTime(i64::MAX)));
}

#[test]
fn operator_watermark_waits_for_every_input_then_takes_the_minimum() {
    let mut m = InputWatermarks::new(3);
    assert_eq!(m.update(0, Watermark::EventTime(100)), None);
    assert_eq!(
        m.update(1, Watermark::EventTime(50)),
        None,
        "input 2 silent: nothing yet"
    );
    assert_eq!(
        m.update(2, Watermark::EventTime(70)),
        Some(Watermark::EventTime(50))
    );
    assert_eq!(
        m.update(0, Watermark::EventTime(200)),
        None,
        "min unchanged"
    );
    assert_eq!(
        m.update(1, Watermark::EventTime(300)),
        Some(Watermark::EventTime(70))
    );
    assert_eq!(m.current(), Some(70));
}

#[test]
fn operator_watermark_skips_idle_inputs_and_never_regresses() {
    let mut m = InputWatermarks::new(2);
    m.update(0, Watermark::EventTime(100));
    assert_eq!(
        m.update(1, Watermark::EventTime(40)),
        Some(Watermark::EventTime(40))
    );
    assert_eq!(
        m.update(1, Watermark::Idle),
        Some(Watermark::EventTime(100))
    );
    assert_eq!(m.update(0, Watermark::Idle), Some(Watermark::Idle));
    assert_eq!(
        m.update(1, Watermark::EventTime(60)),
        Some(Watermark::EventTime(100)),
        "never back"
    );
    assert_eq!(
        m.update(0, Watermark::EventTime(150)),
        None,
        "min(150, 60) is behind 100"
    );
    assert_eq!(
        m.update(1, Watermark::EventTime(120)),
        Some(Watermark::EventTime(120))
    );
}

#[test]
fn operator_watermark_idle_input_that_never_spoke_does_not_block() {
    let mut m = InputWatermarks::new(2);
    assert_eq!(m.update(0, Watermark::EventTime(10)), None);
    assert_eq!(m.update(1, Watermark::Idle), Some(Watermark::EventTime(10)));
}

#[test]
fn finished_inputs_release_the_watermark() {
    let mut m = InputWatermarks::new(2);
    m.update(0, Watermark::EventTime(10));
    m.update(1, Watermark::EventTime(5));
    assert_eq!(m.finish(1), Some(Watermark::EventTime(10)));
    assert_eq!(m.finish(0), Some(Watermark::EventTime(i64::MAX)));
}

#[test]
fn a_subtask_without_partitions_is_idle_not_finished() {
    let mut w = PartitionWatermarks::new(0, 0, IDLE, 0);
    assert!(!w.all_finished(), "partitions may still be assigned");
    assert_eq!(w.poll(0), Some(Watermark::Idle));
}

#[test]
fn a_group_subtask_without_partitions_waits_for_the_first_assignment() {
    let mut w = PartitionWatermarks::new(0, 0, IDLE, 0).awaiting_assignment();
    assert_eq!(w.poll(0), None, "its first partitions may be the oldest");
    w.assignment_came();
    assert_eq!(w.poll(1), Some(Watermark::Idle), "given none: idle at once");

    // A group that never answers holds it for the idle timeout only.
    let mut w = PartitionWatermarks::new(0, 0, IDLE, 0).awaiting_assignment();
    assert_eq!(w.poll(IDLE - 1), None);
    assert_eq!(w.poll(IDLE), Some(Watermark::Idle));

    // Given a partition, it is held by that partition as any other.
    let mut w = PartitionWatermarks::new(0, 0, IDLE, 0).awaiting_assignment();
    w.assign(0, 5);
    w.observe(0, 2_000, 5);
    assert_eq!(w.poll(5), Some(Watermark::EventTime(2_000)));
}

#[test]
fn assigned_partitions_join_and_revoked_ones_leave_the_minimum() {
    let mut w = PartitionWatermarks::new(0, 0, IDLE, 0);
    w.assign(1, 0); // Kafka partition 7, say, at local index 1
    assert_eq!(w.poll(0), None, "assigned, nothing read yet: nothing");
    w.observe(1, 5_000, 0);
    assert_eq!(
        w.poll(0),
        Some(Watermark::EventTime(5_000)),
        "index 0 was never assigned"
    );
    w.assign(0, 1);
    w.observe(0, 3_000, 1);
    assert_eq!(
        w.poll(1),
        None,
        "3000 is behind 5000: the watermark does not go back"
    );
    w.observe(0, 9_000, 2);
    w.observe(1, 8_000, 2);
    assert_eq!(w.poll(2), Some(Watermark::EventTime(8_000)));
    w.revoke(1);
    assert_eq!(
        w.poll(2),
        Some(Watermark::EventTime(9_000)),
        "revoked: no longer held back"
    );
    w.revoke(0);
    assert_eq!(w.poll(2), Some(Watermark::Idle), "nothing assigned: idle");
    assert!(!w.all_finished(), "revoked is not ended");
}

#[test]
fn an_announced_watermark_overrides_event_times_and_never_moves_back() {
    let mut w = PartitionWatermarks::new(2, 0, IDLE, 0);
    w.observe(0, 50_000, 0);
    w.observe(1, 60_000, 0);
    assert_eq!(w.poll(0), Some(Watermark::EventTime(50_000)));
    // Partition 0's writers say they are at 55 s, whatever its rows say.
    w.announce(0, 55_000, 1);
    w.observe(0, 90_000, 1);
    assert_eq!(w.poll(1), Some(Watermark::EventTime(55_000)));
    // An older announcement does not move it back.
    w.announce(0, 52_000, 2);
    assert_eq!(w.poll(2), None);
    w.announce(0, 70_000, 3);
    assert_eq!(
        w.poll(3),
        Some(Watermark::EventTime(60_000)),
        "partition 1 holds it now"
    );
}

#[test]
fn an_announcing_partition_is_held_until_its_first_announcement() {
    // Rows of a repartition partition come from several writers in no
    // event-time order: a row at 900_000 says nothing about what follows.
    let mut w = PartitionWatermarks::new(2, 0, IDLE, 0).announced_only();
    w.observe(0, 900_000, 10);
    w.observe(1, 800_000, 10);
    assert_eq!(w.poll(20), None, "rows alone move nothing");
    w.announce(0, 5_000, 30);
    assert_eq!(w.poll(30), None, "partition 1 has not announced yet");
    w.announce(1, 4_000, 40);
    assert_eq!(w.poll(40), Some(Watermark::EventTime(4_000)));
    // Rows keep a partition active without moving it.
    w.observe(1, 950_000, IDLE);
    assert_eq!(w.poll(IDLE + 40), None);
    // Without the mode, the same rows would have moved it.
    let mut derived = PartitionWatermarks::new(2, 0, IDLE, 0);
    derived.observe(0, 900_000, 10);
    derived.observe(1, 800_000, 10);
    assert_eq!(derived.poll(20), Some(Watermark::EventTime(800_000)));
}

#[test]
fn partitions_turning_idle_are_reported_once() {
    let mut w = PartitionWatermarks::new(2, 0, IDLE, 0);
    w.observe(0, 1_000, 0);
    w.observe(1, 1_000, 0);
    assert_eq!(w.poll(1), Some(Watermark::EventTime(1_000)));
    assert!(w.take_went_idle().is_empty());
    w.observe(0, 2_000, IDLE);
    w.poll(IDLE);
    assert_eq!(w.take_went_idle(), vec![1]);
    w.poll(IDLE + 1);
    assert!(
        w.take_went_idle().is_empty(),
        "still idle: not reported again"
    );
    w.observe(1, 3_000, IDLE + 2);
    w.poll(IDLE + 2);
    assert!(w.take_went_idle().is_empty(), "active again");
    w.poll(2 * IDLE + 2);
    assert_eq!(w.take_went_idle(), vec![0, 1]);
}
