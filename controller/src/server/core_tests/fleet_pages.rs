//! The fleet in pages.

use super::*;

#[test]
fn the_fleet_pages_in_id_order_with_the_selector_and_a_total() {
    let mut x = T::new(false);
    x.fleet(25, "beta");
    for i in 0..5 {
        x.core
            .ingest(state(&format!("x-{i}"), "1.0.0", 1, None, "alpha"), t(0));
    }
    x.flush();
    let mut want: Vec<String> = (0..25).map(|i| format!("dev-{i}")).collect();
    want.sort();
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let p = x
            .core
            .device_page(Some("group=beta"), 10, after.as_deref())
            .unwrap();
        pages += 1;
        assert_eq!(p.total, 25);
        assert!(p.devices.len() <= 10);
        seen.extend(p.devices.iter().map(|d| d.id.clone()));
        match p.next {
            Some(n) => {
                assert_eq!(Some(&n), seen.last());
                after = Some(n);
            }
            None => break,
        }
    }
    assert_eq!((seen, pages), (want, 3));
    // Without a selector: every device; a cursor between ids starts after it.
    let p = x.core.device_page(None, 1000, Some("dev-9z")).unwrap();
    assert_eq!(p.total, 30);
    let ids: Vec<&str> = p.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["x-0", "x-1", "x-2", "x-3", "x-4"]);
    assert_eq!(p.next, None);
    for (sel, limit) in [(None, 0), (None, 1001), (Some("group=="), 10)] {
        let e = x.core.device_page(sel, limit, None).unwrap_err();
        assert_eq!(e.status, 400, "{sel:?} {limit}: {}", e.message);
    }
}
