//! A program embedding the library may install a metrics recorder of its own first: the
//! library's metrics then stay empty instead of panicking. Its own binary, since the recorder is
//! global to the process.

#[test]
fn a_recorder_installed_first_leaves_metrics_empty_without_a_panic() {
    metrics::set_global_recorder(metrics::NoopRecorder).unwrap();
    klarify_sync::metrics::handle();
    assert_eq!(klarify_sync::metrics::render(), "");
}
