//! What reading a pickle costs in memory, measured by a counting allocator: a state_dict
//! as `torch.save` writes it stays within its budget, and hostile pickles that build far
//! more values than their bytes are refused before they take more than the budget.
//!
//! A test binary of its own: the allocator counts every thread, so nothing else runs here.

use std::path::Path;

use tensorlift_pickle::{ErrorKind, Limits, TorchCheckpoint};

/// This process's peak resident memory (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Runs `case` in a fresh process (this test binary again), so that memory freed by one
/// case and reused by the next cannot hide what it took: returns the child's peak resident
/// memory above what it held before reading, and what reading said.
fn measured(case: &str) -> (u64, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pickle_memory_is_bounded_by_a_multiple_of_its_bytes", "--nocapture", "--test-threads=1"])
        .env("TL_MEMORY_CASE", case)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .split_once("MEASURED ")
        .and_then(|(_, rest)| rest.lines().next())
        .unwrap_or_else(|| panic!("{case}: {text}"));
    let (rise, said) = line.split_once(' ').unwrap();
    (rise.parse().unwrap(), said.to_owned())
}

/// The file of each case.
fn case_file(case: &str) -> Vec<u8> {
    match case {
        "short" => torch_like(TENSORS, |i| format!("{i}.w")),
        "long" => torch_like(TENSORS, |i| format!("model.layers.{i}.self_attn.q_proj.weight")),
        // A list appended to itself through the memo, 2 bytes a reference (DUP, 1 byte, is
        // refused as PyTorch refuses it), 64 MiB: before, this took 1.66 GB and `extend`
        // aborted the process under an address-space limit.
        "self_list" => {
            let mut p = b"\x80\x02]q\x00".to_vec();
            for _ in 0..(64 << 20) / 2002 {
                p.push(b'(');
                for _ in 0..1000 {
                    p.extend_from_slice(b"h\x00");
                }
                p.push(b'e');
            }
            p.push(b'.');
            legacy(&p)
        }
        // Empty dicts appended to a list: 2 bytes, and over 100 bytes of values, each.
        "dicts" => {
            let mut p = b"\x80\x02]".to_vec();
            for _ in 0..(16 << 20) / 2 {
                p.extend_from_slice(b"}a");
            }
            p.push(b'.');
            legacy(&p)
        }
        // Marks, each with one item in its frame, 4 bytes a pair (PROTO is free filler), as
        // deep as the stack may go: each frame costs more than a value.
        "marks" => {
            let mut p = b"\x80\x02".to_vec();
            for _ in 0..450_000 {
                p.extend_from_slice(b"(N\x80\x02");
            }
            p.push(b'.');
            legacy(&p)
        }
        _ => unreachable!("{case}"),
    }
}

const TENSORS: usize = 20_000;

fn binunicode(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

fn binput(p: &mut Vec<u8>, memo: &mut u32) {
    if *memo < 256 {
        p.extend_from_slice(&[b'q', *memo as u8]);
    } else {
        p.push(b'r');
        p.extend_from_slice(&memo.to_le_bytes());
    }
    *memo += 1;
}

fn binget(p: &mut Vec<u8>, i: u32) {
    if i < 256 {
        p.extend_from_slice(&[b'h', i as u8]);
    } else {
        p.push(b'j');
        p.extend_from_slice(&i.to_le_bytes());
    }
}

/// A legacy-layout file holding the pickle `torch.save` writes for `n` tensors of one
/// element each, named by `name(i)`: the same opcodes and memo entries (see
/// `python -m pickletools` on a torch.save'd state_dict), and the storages after it.
fn torch_like(n: usize, name: impl Fn(usize) -> String) -> Vec<u8> {
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
    let mut memo = 2u32;
    let (mut rebuild, mut storage, mut class, mut cpu) = (0, 0, 0, 0);
    for i in 0..n {
        binunicode(&mut p, &name(i));
        binput(&mut p, &mut memo);
        if i == 0 {
            p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
            rebuild = memo;
            binput(&mut p, &mut memo);
        } else {
            binget(&mut p, rebuild);
        }
        p.extend_from_slice(b"((");
        if i == 0 {
            binunicode(&mut p, "storage");
            storage = memo;
            binput(&mut p, &mut memo);
            p.extend_from_slice(b"ctorch\nFloatStorage\n");
            class = memo;
            binput(&mut p, &mut memo);
        } else {
            binget(&mut p, storage);
            binget(&mut p, class);
        }
        binunicode(&mut p, &i.to_string());
        binput(&mut p, &mut memo);
        if i == 0 {
            binunicode(&mut p, "cpu");
            cpu = memo;
            binput(&mut p, &mut memo);
        } else {
            binget(&mut p, cpu);
        }
        // A legacy id has a sixth field, the view (None).
        p.extend_from_slice(b"K\x01Nt");
        binput(&mut p, &mut memo);
        p.extend_from_slice(b"QK\x00K\x01\x85");
        binput(&mut p, &mut memo);
        p.extend_from_slice(b"K\x01\x85");
        binput(&mut p, &mut memo);
        p.extend_from_slice(b"\x89h\x00)R");
        binput(&mut p, &mut memo);
        p.push(b't');
        binput(&mut p, &mut memo);
        p.push(b'R');
        binput(&mut p, &mut memo);
    }
    p.extend_from_slice(b"u.");
    let mut v = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
    v.extend_from_slice(&p);
    // The storage keys, then each storage: one float.
    let mut keys = b"\x80\x02(".to_vec();
    for i in 0..n {
        binunicode(&mut keys, &i.to_string());
    }
    keys.extend_from_slice(b"e.");
    // torch writes the key list as EMPTY_LIST, MARK, the keys, APPENDS.
    keys.insert(2, b']');
    v.extend_from_slice(&keys);
    for _ in 0..n {
        v.extend_from_slice(&1u64.to_le_bytes());
        v.extend_from_slice(&[0u8; 4]);
    }
    v
}

/// A legacy-layout file around `pickle` (magic number, protocol, system information, the
/// pickle, no storages).
fn legacy(pickle: &[u8]) -> Vec<u8> {
    let mut v = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
    v.extend_from_slice(pickle);
    v.extend_from_slice(b"\x80\x02].");
    v
}

/// One test, run again in a child process for each case, so that nothing else runs in a
/// process while its memory is measured.
#[test]
fn pickle_memory_is_bounded_by_a_multiple_of_its_bytes() {
    const MIB: u64 = 1 << 20;
    if let Ok(case) = std::env::var("TL_MEMORY_CASE") {
        let file = case_file(&case);
        // The peak so far (building the file) would hide what reading takes below it: reset
        // to what the process holds now (Linux 4.0+).
        std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident memory");
        let before = peak_rss();
        let r = TorchCheckpoint::read(&file[..], Path::new("case.bin"), &Limits::default());
        let said = match &r {
            Ok(ck) => format!("ok {} tensors", ck.tensors.len()),
            Err(e) => e.to_string(),
        };
        println!("MEASURED {} {said}", peak_rss().saturating_sub(before));
        return;
    }
    // State_dicts as torch.save writes them read within the default budget (16 bytes per
    // byte of pickle, and 1 MiB), with short names (the most values per byte) and long.
    for case in ["short", "long"] {
        let file = case_file(case);
        let pickle = (file.len() - TENSORS * 12) as u64;
        let (rise, said) = measured(case);
        eprintln!("{case}: {pickle}-byte pickle: {said}; resident memory rose {rise} bytes");
        assert_eq!(said, format!("ok {TENSORS} tensors"), "{case}");
        // The legacy reader also holds the file's head (here all of it).
        assert!(rise < 16 * pickle + file.len() as u64 + 2 * MIB, "{case}: {rise} for a {pickle}-byte pickle");
    }
    for case in ["self_list", "dicts", "marks"] {
        let len = case_file(case).len() as u64;
        let (rise, said) = measured(case);
        eprintln!("{case}: {len}-byte file: {said}; resident memory rose {rise} bytes");
        assert!(rise < 16 * len + len + 2 * MIB, "{case}: {rise}");
        if case == "dicts" || case == "marks" {
            assert!(said.contains("(pickle_memory_per_byte)"), "{said}");
            // Refused early, not after building 16 times its bytes.
            assert!(rise < 4 * len, "{case}: {rise}");
        } else {
            assert!(said.contains("not a state_dict"), "{said}");
        }
    }
    // The DUP form is refused at the first DUP.
    let dup = legacy(b"\x80\x02]q\x00(2222e.");
    let e = TorchCheckpoint::read(&dup[..], Path::new("dup.bin"), &Limits::default()).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::RefusedOpcode { name: "DUP", .. }), "{e}");
}
