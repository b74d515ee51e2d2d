//! Faults between tensorlift and the server, injected by a proxy: retried where a retry can
//! succeed, an error naming the object and the byte range where it cannot; an object
//! replaced during a load fails it; a dropped load lets go of its requests.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tensorlift::{IoError, LoadError, Loader};
use tensorlift_testkit::net::{Fault, FaultProxy, Rule};

use crate::{assert_identical, base, point_at, quick, sharded, Remote};

/// Matches the GETs of a load's data (planning's first GET of each shard asks from byte 0).
const DATA_GET: &str = "range: bytes=";

fn rule(nth: usize, every: bool, fault: Fault) -> Rule {
    Rule { needle: DATA_GET.into(), nth, every, fault }
}

/// The data GETs of the proxy's log that got a fault, and all of them.
fn data_gets(proxy: &FaultProxy) -> (usize, usize) {
    let log = proxy.log();
    let data: Vec<_> = log.iter().filter(|(r, _)| r.header("range").is_some()).collect();
    (data.iter().filter(|(_, f)| f.is_some()).count(), data.len())
}

#[test]
fn throttling_server_errors_and_broken_bodies_are_retried() {
    let r = Remote::new();
    let truth = sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    for fault in [Fault::SlowDown, Fault::DropMidBody, Fault::Delay(Duration::from_secs(4))] {
        // The 5th ranged GET (past planning's three), and the 9th.
        let proxy = FaultProxy::start(s3.port, vec![rule(5, false, fault), rule(9, false, fault)]).unwrap();
        point_at(proxy.port);
        let model = base().build().unwrap().load_blocking("s3://bucket/model").unwrap();
        assert_identical(&model, &truth, &format!("{fault:?}"));
        let (faulted, all) = data_gets(&proxy);
        assert_eq!(faulted, 2, "{fault:?}: {all} GETs");
    }
}

#[test]
fn a_fault_that_outlasts_the_retries_names_the_object_and_range() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    // From the 5th ranged GET on, every one is throttled.
    let proxy = FaultProxy::start(s3.port, vec![rule(5, true, Fault::SlowDown)]).unwrap();
    point_at(proxy.port);
    let mut o = quick();
    o.retries = 2;
    let err = base().remote(o).build().unwrap().load_blocking("s3://bucket/model").unwrap_err();
    let LoadError::Read { file, source: IoError::Remote { offset, len, .. }, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(file.to_string_lossy().starts_with("s3://bucket/model/model-0000"), "{err}");
    assert!(*len > 0 && *len <= 64 << 10, "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("at offset {offset}")) && text.contains("503"), "{text}");
    // A failing part was tried three times (one try and two retries): the most any range of
    // one object was asked for.
    let mut by_range = std::collections::BTreeMap::new();
    for (req, fault) in proxy.log() {
        if fault == Some(Fault::SlowDown) {
            *by_range.entry((req.target.clone(), req.header("range").unwrap_or("").to_owned())).or_insert(0) += 1;
        }
    }
    assert_eq!(by_range.values().max(), Some(&3), "{by_range:?}");
}

#[test]
fn an_object_replaced_after_planning_fails_the_load() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(_s3) = r.s3() else { return };
    let loader = base().build().unwrap();
    let plan = loader.plan("s3://bucket/model").unwrap();
    // Same length, other bytes: only the object's ETag tells.
    let shard = r.root.join("bucket/model/model-00003-of-00003.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    let err = loader.load_plan_blocking(plan).unwrap_err();
    assert!(
        matches!(&err, LoadError::ShardChanged { file, what }
            if file.ends_with("model-00003-of-00003.safetensors") && what.contains("ETag")),
        "{err:?}"
    );
    // Cut short: the length tells.
    let plan = loader.plan("s3://bucket/model").unwrap();
    std::fs::write(&shard, &bytes[..last]).unwrap();
    let err = loader.load_plan_blocking(plan).unwrap_err();
    assert!(matches!(&err, LoadError::ShardChanged { what, .. } if what.contains("length")), "{err:?}");
}

#[test]
fn a_dropped_load_cancels_its_requests() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    // Every data GET is held for a minute: the load cannot finish while the test runs.
    let proxy = FaultProxy::start(s3.port, vec![rule(4, true, Fault::Delay(Duration::from_secs(60)))]).unwrap();
    point_at(proxy.port);
    let mut o = quick();
    o.timeout = Duration::from_secs(120);
    let loader = base().remote(o).build().unwrap();
    let mut stream = loader.stream_blocking("s3://bucket/model").unwrap();
    // Polled, the load issues its first GETs and waits (a tensor of no bytes is ready at once).
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for _ in 0..100 {
        let mut next = std::pin::pin!(stream.next());
        match next.as_mut().poll(&mut cx) {
            std::task::Poll::Pending => break,
            std::task::Poll::Ready(t) => assert_eq!(t.unwrap().unwrap().to_host().unwrap().len(), 0),
        }
    }
    // Wait until the proxy holds some of the load's GETs, then drop the load.
    let held = |p: &FaultProxy| p.log().iter().filter(|(_, f)| f.is_some()).count();
    let t = Instant::now();
    while held(&proxy) == 0 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(held(&proxy) > 0, "the load issued no data GETs");
    drop(stream);
    drop(loader);
    // Every held request sees its client go away, well before its minute is up.
    let t = Instant::now();
    while proxy.abandoned() < held(&proxy) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.abandoned(), held(&proxy), "requests left running after the load was dropped");
}

#[test]
fn a_reply_longer_than_its_range_is_refused_not_kept() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    // Planning's first GET of the first shard comes back with 64 MiB more than it asked.
    let pad = Rule { needle: "range: bytes=0-65535".into(), nth: 1, every: true, fault: Fault::Pad(64 << 20) };
    let proxy = FaultProxy::start(s3.port, vec![pad]).unwrap();
    point_at(proxy.port);
    let mut o = quick();
    o.retries = 0;
    let err = base().remote(o).build().unwrap().load_blocking("s3://bucket/model").unwrap_err().to_string();
    assert!(err.contains("more than it was asked"), "{err}");
    assert!(proxy.log().iter().any(|(_, f)| matches!(f, Some(Fault::Pad(_)))));
}

/// A reply whose `Content-Range` is not the range asked for, or names bytes past any
/// file's (a number that overflows when its end is made exclusive), fails the load with
/// the server's header named, never a panic and never other bytes.
#[test]
fn a_content_range_that_is_not_the_range_asked_is_refused() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    let cases = [
        ("bytes 0-18446744073709551615/18446744073709551615", "Content-Range"),
        ("bytes 18446744073709551615-18446744073709551615/*", "Content-Range"),
        ("bytes 9-3/100", "Content-Range"),
        ("bytes 0-65535/4", "Content-Range"),
        ("bytes 1-65536/99999999", "Requested"),
    ];
    for (value, says) in cases {
        // Planning's first GET of a shard, then a load's data GET.
        for needle in ["range: bytes=0-65535", DATA_GET] {
            let nth = if needle == DATA_GET { 5 } else { 1 };
            let fault = Rule { needle: needle.into(), nth, every: true, fault: Fault::ContentRange(value) };
            let proxy = FaultProxy::start(s3.port, vec![fault]).unwrap();
            point_at(proxy.port);
            let mut o = quick();
            o.retries = 0;
            let err = base().remote(o).build().unwrap().load_blocking("s3://bucket/model").unwrap_err();
            let text = format!("{err}: {err:?}");
            assert!(text.contains(says), "{value} at {needle}: {text}");
            assert!(proxy.log().iter().any(|(_, f)| matches!(f, Some(Fault::ContentRange(_)))), "{value}");
        }
    }
}

/// A load dropped while it is still planning (listing the folder, reading headers, reading
/// a PyTorch file's directory on a blocking thread) lets go of planning's requests too; so
/// does a plan asked for by `plan_async`.
#[test]
fn a_load_dropped_while_planning_cancels_its_requests() {
    let r = Remote::new();
    sharded(&r.root);
    // A PyTorch file past the first GET (64 KiB): its zip directory comes by GETs of the
    // pickle reader's own.
    let torch_dir = r.root.join("bucket/torch");
    std::fs::create_dir_all(&torch_dir).unwrap();
    let script = "import sys, torch\n\
                  torch.save({f'w{i}': torch.full((32, 160), float(i)) for i in range(6)}, sys.argv[1])";
    let file = torch_dir.join("pytorch_model.bin");
    crate::torch_writes(script, &file);
    assert!(std::fs::metadata(&file).unwrap().len() > 96 << 10);
    let Some(s3) = r.s3() else { return };
    type Start = for<'a> fn(&'a Loader, &'static str) -> Pin<Box<dyn Future<Output = ()> + 'a>>;
    let starts: [(&str, Start); 2] = [
        ("stream", |l, url| Box::pin(async move { drop(l.stream(url).await) })),
        ("plan_async", |l, url| Box::pin(async move { drop(l.plan_async(url).await) })),
    ];
    for (url, nth) in [
        // Every request is held: the folder's listing, or a shard's first GET (a task of
        // planning's own).
        ("s3://bucket/model", 0),
        ("s3://bucket/model/model-00002-of-00003.safetensors", 0),
        // The first bytes come; the pickle reader's GETs are held.
        ("s3://bucket/torch/pytorch_model.bin", 2),
    ] {
        for (how, start) in starts {
            let held_from = match nth {
                0 => Rule { needle: String::new(), nth: 1, every: true, fault: hold() },
                n => rule(n, true, hold()),
            };
            let proxy = FaultProxy::start(s3.port, vec![held_from]).unwrap();
            point_at(proxy.port);
            let mut o = quick();
            o.timeout = Duration::from_secs(120);
            let loader = base().remote(o).build().unwrap();
            let held = |p: &FaultProxy| p.log().iter().filter(|(_, f)| f.is_some()).count();
            {
                // Polled once, planning starts; wait until the proxy holds a request.
                let mut planning = start(&loader, url);
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                assert!(planning.as_mut().poll(&mut cx).is_pending(), "{url}, {how}");
                let t = Instant::now();
                while held(&proxy) == 0 && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                assert!(held(&proxy) > 0, "{url}, {how}: planning issued no request");
            }
            // Dropped: every held request sees its client go, well before its minute is up
            // (within the 30 s waited here: no tighter bound, which a loaded machine could miss).
            let t = Instant::now();
            while proxy.abandoned() < held(&proxy) && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(proxy.abandoned(), held(&proxy), "{url}, {how}: planning's requests outlived it");
        }
    }
}

fn hold() -> Fault {
    Fault::Delay(Duration::from_secs(60))
}

/// A verified load fetches its `SHA256SUMS` and index from the store once planned: on a
/// thread of its own, so that an async caller's thread goes on serving its other tasks
/// meanwhile (here a one-thread runtime whose other task counts while the fetch is held).
#[test]
fn a_verified_load_waits_for_its_digests_without_holding_its_callers_thread() {
    let r = Remote::new();
    let truth = sharded(&r.root);
    crate::loads::with_sums(&r.root);
    let Some(s3) = r.s3() else { return };
    let held = Duration::from_secs(2);
    let rules = vec![Rule { needle: "SHA256SUMS".into(), nth: 1, every: false, fault: Fault::Delay(held) }];
    let proxy = FaultProxy::start(s3.port, rules).unwrap();
    point_at(proxy.port);
    let loader = base().verify(tensorlift::Verify::Required).build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let (model, ticks) = rt.block_on(async {
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counting = std::sync::Arc::clone(&ticks);
        let counter = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                counting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let model = loader.load("s3://bucket/model").await;
        counter.abort();
        (model, ticks.load(std::sync::atomic::Ordering::Relaxed))
    });
    assert_identical(&model.unwrap(), &truth, "verified");
    assert!(proxy.log().iter().any(|(_, f)| f.is_some()), "the SHA256SUMS GET was not held");
    // Two seconds held: about 40 ticks, where a blocked thread would give none then.
    assert!(ticks >= 20, "the caller's thread ticked {ticks} times while the digests were fetched");
}

/// A sharded checkpoint with its `SHA256SUMS` on the S3 server, behind a proxy that holds
/// every GET of `SHA256SUMS` for a minute, the environment pointed at the proxy (`None`
/// where there is no S3 server); the server and the folder live as long as what is returned.
fn digests_held() -> Option<(Remote, tensorlift_testkit::net::S3Server, FaultProxy)> {
    let r = Remote::new();
    sharded(&r.root);
    crate::loads::with_sums(&r.root);
    let s3 = r.s3()?;
    let rules =
        vec![Rule { needle: "SHA256SUMS".into(), nth: 1, every: true, fault: Fault::Delay(Duration::from_secs(60)) }];
    let proxy = FaultProxy::start(s3.port, rules).unwrap();
    point_at(proxy.port);
    Some((r, s3, proxy))
}

/// A verified load dropped while its `SHA256SUMS` GET is held lets go of the request (the
/// digests' thread gives it up), well before the server's minute is up: nothing is left
/// talking to the store for a load nobody waits for.
#[test]
fn a_dropped_verified_load_gives_up_fetching_its_digests() {
    let Some((_r, _s3, proxy)) = digests_held() else { return };
    let mut o = quick();
    o.timeout = Duration::from_secs(120);
    let loader = base().remote(o).verify(tensorlift::Verify::Required).build().unwrap();
    let held = |p: &FaultProxy| p.log().iter().filter(|(_, f)| f.is_some()).count();
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let load = loader.load("s3://bucket/model");
        tokio::pin!(load);
        // Polled until the digests' GET is held, then dropped.
        let t = Instant::now();
        while held(&proxy) == 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "the SHA256SUMS GET was never made");
            tokio::select! {
                _ = &mut load => panic!("the load ended while its SHA256SUMS GET was held"),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    });
    let t = Instant::now();
    while proxy.abandoned() < held(&proxy) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.abandoned(), held(&proxy), "the digests' request was left running after the load was dropped");
}

/// A digests' fetch that outlasts `plan_timeout` fails the verified load, and the error
/// names that fetch (planning itself ended well within its bound).
#[test]
fn a_digest_fetch_that_outlasts_its_plan_timeout_says_so() {
    let Some((_r, _s3, _proxy)) = digests_held() else { return };
    let mut o = quick();
    o.timeout = Duration::from_secs(120);
    o.plan_timeout = Duration::from_secs(2);
    let loader = base().remote(o).verify(tensorlift::Verify::Required).build().unwrap();
    let err = loader.load_blocking("s3://bucket/model").unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("fetching SHA256SUMS took longer than its plan_timeout (2 s"), "{text}");
    assert!(!text.contains("planning took longer"), "{text}");
}

/// loader-bench's GET limit fetches each shard's every byte once, by GETs checked as a
/// load's are: each names the ETag planned, and an object replaced since fails it.
#[test]
fn the_get_limit_fetches_every_byte_once_and_sees_a_replaced_object() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    let proxy = FaultProxy::start(s3.port, vec![]).unwrap();
    point_at(proxy.port);
    let mut limits = tensorlift::PlanLimits::default();
    limits.remote = quick();
    let plan = tensorlift_io::open_checkpoint(std::path::Path::new("s3://bucket/model"), &limits).unwrap();
    let objects: Vec<_> = (0..plan.shards().len()).filter_map(|i| plan.remote_object(i).cloned()).collect();
    let lens: Vec<u64> = objects.iter().map(|o| o.len()).collect();
    let before = proxy.log().len();
    let fetched = tensorlift_io::remote::fetch_discarding(&objects).unwrap();
    assert_eq!(fetched, lens.iter().sum::<u64>());
    let gets: Vec<_> = proxy.log()[before..].iter().map(|(r, _)| r.clone()).collect();
    let part = quick().part_size();
    assert_eq!(gets.len() as u64, lens.iter().map(|n| n.div_ceil(part)).sum::<u64>());
    assert!(gets.iter().all(|g| g.header("range").is_some() && g.header("if-match").is_some()), "{gets:?}");
    // Same length, other bytes: the ETag tells.
    let shard = r.root.join("bucket/model/model-00002-of-00003.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    let err = tensorlift_io::remote::fetch_discarding(&objects).unwrap_err();
    assert!(
        matches!(&err, IoError::Changed { file, .. } if file.ends_with("model-00002-of-00003.safetensors")),
        "{err:?}"
    );
}

#[test]
fn a_broken_body_is_resumed_only_where_a_strong_etag_names_the_bytes() {
    use tensorlift_testkit::net::{HttpServer, Validators};
    let r = Remote::new();
    let single = r.root.join("bucket/single");
    std::fs::create_dir_all(&single).unwrap();
    let truth = tensorlift_testkit::write_shard(&single.join("model.safetensors"), &crate::quirky());
    for validators in [Validators::Both, Validators::Weak] {
        let http = HttpServer::start_with(&r.root, validators).unwrap();
        // The 2nd ranged GET (past planning's one) breaks off halfway through its body.
        let proxy = FaultProxy::start(http.port, vec![rule(2, false, Fault::DropMidBody)]).unwrap();
        let url = format!("http://127.0.0.1:{}/bucket/single/model.safetensors", proxy.port);
        let result = base().build().unwrap().load_blocking(&url);
        let log = proxy.log();
        let broken = log.iter().find(|(_, f)| *f == Some(Fault::DropMidBody)).expect("a GET broke off");
        let range = broken.0.header("range").unwrap().trim_start_matches("bytes=").to_owned();
        let (first, last) = range.split_once('-').unwrap();
        let (first, last): (u64, u64) = (first.parse().unwrap(), last.parse().unwrap());
        // What the proxy let through (half the body), and so where a resumed GET starts.
        let rest = format!("bytes={}-{last}", first + (last + 1 - first) / 2);
        let resumed = log.iter().any(|(req, _)| req.header("range") == Some(rest.as_str()));
        match validators {
            // object_store resumes with a GET of the rest, which the ETag ties to the bytes
            // already read.
            Validators::Both => {
                assert_identical(&result.unwrap(), &truth, "a strong ETag");
                assert!(resumed, "no GET of {rest}: {log:?}");
            }
            // A weak ETag says nothing of the bytes: the rest could come from another
            // version, spliced to this one's. The part fails instead, naming its range.
            _ => {
                let err = result.unwrap_err();
                assert!(
                    matches!(&err, LoadError::Read { source: IoError::Remote { offset, .. }, .. } if *offset == first),
                    "{err:?}"
                );
                assert!(!resumed, "a GET of {rest} resumed a body of a weak ETag");
            }
        }
    }
    // Without a fault, a weak ETag's object loads, known by its length and Last-Modified.
    let http = HttpServer::start_with(&r.root, Validators::Weak).unwrap();
    let url = format!("http://127.0.0.1:{}/bucket/single/model.safetensors", http.port);
    assert_identical(&base().build().unwrap().load_blocking(&url).unwrap(), &truth, "a weak ETag");
    // GCS's client requires an ETag of every reply: a weak one is refused, saying so.
    let key = format!(
        r#"{{"gcs_base_url": "http://127.0.0.1:{}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#,
        http.port
    );
    std::env::set_var("GOOGLE_SERVICE_ACCOUNT_KEY", key);
    let gcs = base().build().unwrap().load_blocking("gs://bucket/single/model.safetensors");
    std::env::remove_var("GOOGLE_SERVICE_ACCOUNT_KEY");
    let err = gcs.unwrap_err().to_string();
    assert!(err.contains("ETag is weak (W/"), "{err}");
}

#[test]
fn planning_that_outlasts_its_plan_timeout_is_given_up() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    // Every request answered slowly, each within its own timeout: planning's requests
    // together take longer than its bound.
    let every = Rule { needle: String::new(), nth: 1, every: true, fault: Fault::Delay(Duration::from_millis(700)) };
    let proxy = FaultProxy::start(s3.port, vec![every]).unwrap();
    point_at(proxy.port);
    let mut o = quick();
    o.plan_timeout = Duration::from_secs(1);
    let err = base().remote(o).build().unwrap().plan("s3://bucket/model").unwrap_err();
    assert!(err.to_string().contains("planning took longer than its plan_timeout (1 s"), "{err}");
    // With room, the same server is planned.
    let mut o = quick();
    o.plan_timeout = Duration::from_secs(120);
    assert_eq!(base().remote(o).build().unwrap().plan("s3://bucket/model").unwrap().shards().len(), 3);
}

/// A credential an HTTP header cannot hold (a secret made from a file often ends in a
/// newline), on which the request signer would panic, is refused by its variable's name,
/// without its value.
#[test]
fn a_credential_a_header_cannot_hold_is_refused_by_name() {
    let r = Remote::new();
    sharded(&r.root);
    let Some(s3) = r.s3() else { return };
    let key = tensorlift_testkit::net::S3_KEYS.0;
    for (var, value) in [("AWS_ACCESS_KEY_ID", format!("{key}\n")), ("AWS_SESSION_TOKEN", "s3cr3t-t0ken\r".to_owned())]
    {
        std::env::set_var(var, &value);
        let err = base().build().unwrap().plan("s3://bucket/model").map(|_| ()).unwrap_err().to_string();
        std::env::remove_var("AWS_SESSION_TOKEN");
        point_at(s3.port);
        assert!(err.contains(&format!("{var} holds a control character")), "{err}");
        assert!(!err.contains(value.trim_end()), "the value is echoed: {err}");
    }
    // An endpoint with a password or a query in it, which every error of the store's client
    // would print: refused by name, its secret not echoed.
    let endpoint = format!("http://user:EPSECRET@127.0.0.1:{}", s3.port);
    for (var, value) in
        [("AWS_ENDPOINT_URL", endpoint), ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1/?x=QSECRET".to_owned())]
    {
        std::env::set_var(var, &value);
        let err = base().build().unwrap().plan("s3://bucket/model").map(|_| ()).unwrap_err();
        std::env::remove_var("AWS_ENDPOINT_URL_S3");
        point_at(s3.port);
        let err = format!("{err:#} {err:?}");
        assert!(err.contains(&format!("{var} ")) && err.contains("holds a user, password, query"), "{err}");
        assert!(!err.contains("SECRET"), "the value is echoed: {err}");
    }
    // An `@` in an endpoint's path is a place's, not refused (the server has no such path).
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}/gw@v1", s3.port));
    let err = base().build().unwrap().plan("s3://bucket/model").map(|_| ()).unwrap_err();
    point_at(s3.port);
    assert!(!format!("{err:#}").contains("holds a user"), "{err:#}");
    // Mended, the same server is planned.
    assert_eq!(base().build().unwrap().plan("s3://bucket/model").unwrap().shards().len(), 3);
}
