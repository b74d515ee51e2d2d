//! tensorlift-pickle against files written as `torch.save` writes them
//! (`scripts/make-torch-fixtures.py`), and against hostile ones.

use std::path::{Path, PathBuf};

mod differential;

use tensorlift_pickle::{ErrorKind, Layout, Limits, TorchCheckpoint};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn read(name: &str) -> Result<TorchCheckpoint, tensorlift_pickle::TorchError> {
    let path = fixture(name);
    let f = std::fs::File::open(&path).unwrap();
    TorchCheckpoint::read(&f, &path, &Limits::default())
}

fn read_bytes(bytes: &[u8]) -> Result<TorchCheckpoint, tensorlift_pickle::TorchError> {
    TorchCheckpoint::read(bytes, Path::new("test.bin"), &Limits::default())
}

/// Every tensor's dtype, shape and contiguous bytes equal numpy's reading of the same
/// data, in the state_dict's order; non-tensor entries are listed as skipped.
fn check_against_numpy(case: &str, layout: Layout, file: &str) {
    let ck = read(file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.layout, layout);
    let want: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{case}.expect.json"))).unwrap()).unwrap();
    let path = fixture(file);
    let f = std::fs::File::open(&path).unwrap();
    let mut names: Vec<_> = ck.tensors.iter().map(|t| t.name.clone()).collect();
    names.sort();
    let mut want_names: Vec<_> = want.keys().cloned().collect();
    want_names.sort();
    assert_eq!(names, want_names, "{file}");
    for t in &ck.tensors {
        assert_tensor_is(&ck, &f, &path, t, &want[&t.name]);
    }
}

/// The tensor's dtype, shape and contiguous bytes are what `want` (an expect.json entry:
/// dtype, shape, hex) says.
fn assert_tensor_is(
    ck: &TorchCheckpoint,
    f: &std::fs::File,
    path: &Path,
    t: &tensorlift_pickle::TorchTensor,
    want: &serde_json::Value,
) {
    let what = format!("{}: {}", path.display(), t.name);
    assert_eq!(t.dtype.to_string(), want["dtype"].as_str().unwrap(), "{what}");
    let shape: Vec<usize> = want["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    assert_eq!(t.shape, shape, "{what}");
    let bytes = ck.tensor_bytes(f, path, t).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, want["hex"].as_str().unwrap(), "{what}");
    assert_eq!(bytes.len(), t.nbytes(), "{what}");
}

#[test]
fn every_dtype_in_both_layouts() {
    check_against_numpy("every_dtype", Layout::Zip, "every_dtype.zip.bin");
    check_against_numpy("every_dtype", Layout::Legacy, "every_dtype.legacy.bin");
    let ck = read("every_dtype.zip.bin").unwrap();
    // The state_dict's order is kept, and _metadata (set by BUILD) is not a tensor.
    assert_eq!(ck.tensors[0].name, "float64.matrix");
    assert!(ck.skipped.is_empty());
    let scalar = ck.tensors.iter().find(|t| t.name == "bfloat16.scalar").unwrap();
    assert!(scalar.shape.is_empty() && scalar.nbytes() == 2);
}

#[test]
fn views_tied_weights_and_strides_in_both_layouts() {
    for (layout, file) in [(Layout::Zip, "views.zip.bin"), (Layout::Legacy, "views.legacy.bin")] {
        check_against_numpy("views", layout, file);
        let ck = read(file).unwrap();
        let get = |n: &str| ck.tensors.iter().find(|t| t.name == n).unwrap();
        assert!(get("embed.weight").is_contiguous());
        assert!(!get("transposed").is_contiguous());
        assert!(!get("column_slice").is_contiguous());
        assert!(get("row_slice").is_contiguous());
        assert_eq!(get("row_slice").storage_offset, 12);
        // Tied weights view one storage, which appears once.
        assert_eq!(get("embed.weight").storage, get("lm_head.weight").storage);
        assert_eq!(ck.storages.len(), 2);
        assert_eq!(ck.skipped, vec!["epoch".to_owned()]);
    }
}

fn kind(r: Result<TorchCheckpoint, tensorlift_pickle::TorchError>) -> (ErrorKind, String) {
    let e = r.expect_err("the file must be refused");
    let s = e.to_string();
    (e.kind, s)
}

#[test]
fn forbidden_globals_are_named_and_never_called() {
    for (file, module, name) in [
        // Protocol 2 writes Python 3 names as Python 2 spelled them.
        ("evil_system.bin", "posix", "system"),
        ("evil_eval.bin", "__builtin__", "eval"),
        ("evil_subprocess.bin", "commands", "check_output"),
    ] {
        let (k, s) = kind(read(file));
        match k {
            ErrorKind::RefusedGlobal { module: m, name: n, .. } => {
                assert_eq!((m.as_str(), n.as_str()), (module, name), "{s}")
            }
            other => panic!("{file}: {other:?}"),
        }
        assert!(s.contains(&format!("refused global '{module}.{name}'")), "{s}");
        assert!(s.starts_with(&fixture(file).display().to_string()), "{s}");
    }
}

#[test]
fn an_allowed_global_with_wrong_arguments_is_refused() {
    let (k, s) = kind(read("evil_rebuild_args.bin"));
    assert!(matches!(k, ErrorKind::Pickle { .. }), "{s}");
    assert!(s.contains("torch._utils._rebuild_tensor_v2 with wrong arguments: the first is not a storage"), "{s}");
}

#[test]
fn big_endian_compressed_truncated_and_short_storages_are_refused() {
    let (k, _) = kind(read("big_endian.bin"));
    assert!(matches!(k, ErrorKind::BigEndian));
    // The legacy layout says so in its system information.
    let mut v = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.".to_vec();
    v.extend_from_slice(b"\x80\x02}X\x0d\x00\x00\x00little_endian\x89s.\x80\x02}.\x80\x02].");
    let (k, s) = kind(read_bytes(&v));
    assert!(matches!(k, ErrorKind::BigEndian), "{s}");
    let (k, s) = kind(read("compressed.bin"));
    assert!(matches!(k, ErrorKind::Zip(_)) && s.contains("is compressed (method 8)"), "{s}");
    let (k, s) = kind(read("truncated.bin"));
    assert!(matches!(k, ErrorKind::Zip(_)) && s.contains("no end of central directory"), "{s}");
    let (_, s) = kind(read("storage_past_entry.bin"));
    assert!(s.contains("storage '0' holds 2 elements (8 bytes) but its entry has 4 bytes"), "{s}");
}

/// A legacy file around `pickle`: magic number, protocol version, system information,
/// then `pickle` and an empty list of storage keys.
fn legacy(pickle: &[u8]) -> Vec<u8> {
    let mut v = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    v.extend_from_slice(b"\x80\x02M\xe9\x03.");
    v.extend_from_slice(b"\x80\x02}.");
    v.extend_from_slice(pickle);
    v.extend_from_slice(b"\x80\x02].");
    v
}

#[test]
fn opcodes_that_build_objects_are_refused() {
    for (code, name) in [
        (&b"\x80\x02(cos\nsystem\nS'ls'\ni."[..], "refused global 'os.system'"),
        (b"\x80\x02(i__main__\nX\n.", "refused pickle opcode INST"),
        (b"\x80\x02X\x01\x00\x00\x00a)\x81.", "NEWOBJ of a str, not an allowed class"),
        (b"\x80\x02ctorch\nTensor\n)\x81.", "NEWOBJ of torch.Tensor is refused"),
        (b"\x80\x02(o.", "refused pickle opcode OBJ"),
        (b"\x80\x02\x82\x01.", "refused pickle opcode EXT"),
        (b"\x80\x02I1\n.", "protocol-0 text opcode"),
        (b"\x80\x02c__builtin__\ngetattr\n.", "refused global '__builtin__.getattr'"),
        // What PyTorch's weights-only unpickler refuses too: protocol 4's opcodes, DUP,
        // POP, and the Python 2 BINSTRING.
        (b"\x80\x02\x8c\x02os\x8c\x06system\x93.", "refused pickle opcode SHORT_BINUNICODE"),
        (b"\x80\x02X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93.", "refused pickle opcode STACK_GLOBAL"),
        (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}.", "refused pickle opcode FRAME"),
        (b"\x80\x02}\x94.", "refused pickle opcode MEMOIZE"),
        (b"\x80\x02}2.", "refused pickle opcode DUP"),
        (b"\x80\x02}N0.", "refused pickle opcode POP"),
        (b"\x80\x02T\x01\x00\x00\x00a.", "refused pickle opcode BINSTRING"),
        // Globals outside PyTorch's allowlist, including aliases of allowed ones.
        (b"\x80\x02ctorch\nfloat\n.", "refused global 'torch.float'"),
        (b"\x80\x02ctorch.cuda\nQInt8Storage\n.", "refused global 'torch.cuda.QInt8Storage'"),
        (b"\x80\x02cbuiltins\ndict\n.", "refused global 'builtins.dict'"),
    ] {
        let (_, s) = kind(read_bytes(&legacy(code)));
        assert!(s.contains(name), "{s}");
    }
}

#[test]
fn reduce_and_build_act_only_on_allowed_values() {
    // OrderedDict called with arguments; BUILD on a list; REDUCE on a string.
    for (code, want) in [
        (&b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R."[..], "collections.OrderedDict with wrong arguments"),
        (b"\x80\x02]}b.", "BUILD on a list is refused"),
        (b"\x80\x02}}b.", "BUILD on a dict (not an OrderedDict) is refused"),
        (b"\x80\x02ccollections\nOrderedDict\n)RNb.", "BUILD with None as the state is refused"),
        (b"\x80\x02ctorch._utils\n_rebuild_qtensor\n)R.", "allowed by PyTorch but not read by tensorlift"),
        (b"\x80\x02}]]s.", "SETITEM with a list as a key (unhashable)"),
        (b"\x80\x02](Na.", "APPEND to nothing: only lists are appended to"),
        (b"\x80\x02X\x01\x00\x00\x00a)R.", "REDUCE calls a str"),
        (b"\x80\x02ctorch\nFloatStorage\n)R.", "storages are not built by REDUCE"),
    ] {
        let (_, s) = kind(read_bytes(&legacy(code)));
        assert!(s.contains(want), "{s}");
    }
}

#[test]
fn deep_nesting_and_huge_memo_indexes_are_bounded() {
    // 300,000 lists, each inside the last (through the memo): no recursion walks or drops
    // them, so this is an ordinary "not a state_dict", not a stack overflow.
    let mut p = b"\x80\x02]q\x00".to_vec();
    for _ in 0..300_000 {
        // Mark; push the deepest list; push a new one, which becomes the deepest (memo 0);
        // append it to the deepest; append the deepest to the outer list.
        p.extend_from_slice(b"(h\x00]q\x00ae");
    }
    p.push(b'.');
    let (k, s) = kind(read_bytes(&legacy(&p)));
    assert!(matches!(k, ErrorKind::NotStateDict(_)), "{s}");
    // A memo index of 2^32-1 is one entry, not a 4-billion-entry table.
    let ck = read_bytes(&legacy(b"\x80\x02}r\xff\xff\xff\xffj\xff\xff\xff\xff.")).unwrap();
    assert!(ck.tensors.is_empty());
    // A reference to a memo entry never stored.
    let (_, s) = kind(read_bytes(&legacy(b"\x80\x02h\x05.")));
    assert!(s.contains("memo entry 5 was never stored"), "{s}");
    // Marks without end.
    let limits = Limits::default().max_pickle_stack(1000);
    let mut marks = b"\x80\x02".to_vec();
    marks.extend(std::iter::repeat_n(b'(', 5000));
    marks.push(b'.');
    let e = TorchCheckpoint::read(&legacy(&marks)[..], Path::new("m.bin"), &limits).unwrap_err();
    assert!(e.to_string().contains("max_pickle_stack"), "{e}");
}

#[test]
fn sizes_in_the_pickle_are_checked_against_the_file() {
    // A tensor of 2^40 elements over a storage of 4: refused before any allocation.
    let pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04NtQ";
    let mut p = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    p.extend_from_slice(pid);
    p.extend_from_slice(b"K\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x85K\x01\x85\x89}tRs.");
    let mut v = legacy(&p);
    // The storage keys list names storage '0', whose bytes are 4 floats.
    v.truncate(v.len() - 4);
    v.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x000a.");
    v.extend_from_slice(&4u64.to_le_bytes());
    v.extend_from_slice(&[0u8; 16]);
    let (_, s) = kind(read_bytes(&v));
    assert!(s.contains("tensor 'w': its elements reach 1099511627775 but storage '0' holds 4"), "{s}");
    // Eight elements with a stride of 0 over the same 4-element storage (as `expand` makes):
    // read as PyTorch reads them, eight copies of the first element.
    let mut q = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    q.extend_from_slice(pid);
    q.extend_from_slice(b"K\x00K\x08\x85K\x00\x85\x89}tRs.");
    let mut x = legacy(&q);
    x.truncate(x.len() - 4);
    x.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x000a.");
    x.extend_from_slice(&4u64.to_le_bytes());
    x.extend_from_slice(&[0u8; 16]);
    let ck = read_bytes(&x).unwrap();
    assert_eq!((ck.tensors[0].shape.as_slice(), ck.tensors[0].strides.as_slice()), (&[8][..], &[0][..]));
    assert_eq!(ck.tensor_bytes(&x[..], Path::new("x.bin"), &ck.tensors[0]).unwrap(), vec![0u8; 32]);
    // The same storage claiming 2^40 elements in the file's size field.
    let mut w = v[..v.len() - 24].to_vec();
    w.extend_from_slice(&(1u64 << 40).to_le_bytes());
    w.extend_from_slice(&[0u8; 16]);
    let (_, s) = kind(read_bytes(&w));
    assert!(s.contains("runs past the end of the"), "{s}");
}

#[test]
fn not_torch_files_say_what_they_are_not() {
    let (k, s) = kind(read_bytes(b""));
    assert!(matches!(k, ErrorKind::NotTorch(_)), "{s}");
    let (_, s) = kind(read_bytes(b"\x80\x02}."));
    assert!(s.contains("no magic number"), "{s}");
    let (_, s) = kind(read_bytes(b"ustar and some tar-looking bytes"));
    assert!(s.contains("neither a zip archive nor a pickle"), "{s}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Any bytes after a valid legacy preamble: an error or a checkpoint, never a panic.
    #[test]
    fn arbitrary_pickles_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
        let _ = read_bytes(&legacy(&body));
    }

    /// Damaging any byte of a valid zip checkpoint: an error or a checkpoint, never a panic.
    #[test]
    fn damaged_zips_never_panic(at in 0usize..1743, byte in proptest::prelude::any::<u8>()) {
        let mut v = std::fs::read(fixture("views.zip.bin")).unwrap();
        let i = at % v.len();
        v[i] = byte;
        if let Ok(ck) = read_bytes(&v) {
            for t in &ck.tensors {
                let _ = ck.tensor_bytes(&v[..], Path::new("x"), t);
            }
        }
    }
}

/// Files `torch.save` itself wrote (PyTorch 2.15, `scripts/make-real-torch-fixtures.py`):
/// every dtype torch can save (float8 and uint16-64 through `_rebuild_tensor_v3` and
/// untyped storages), views, tied weights and an `nn.Linear`'s state_dict, in both layouts,
/// equal to the bytes torch reads back.
#[test]
fn files_written_by_torch_itself_read_as_torch_reads_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-torch");
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expect.json")).unwrap()).unwrap();
    let want = want["tensors"].as_object().unwrap();
    for (file, layout) in [("state_dict.zip.bin", Layout::Zip), ("state_dict.legacy.bin", Layout::Legacy)] {
        let path = dir.join(file);
        let f = std::fs::File::open(&path).unwrap();
        let ck = TorchCheckpoint::read(&f, &path, &Limits::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ck.layout, layout);
        let expected: Vec<&String> = want
            .iter()
            .filter(|(_, w)| layout == Layout::Zip || w["legacy"].as_bool().unwrap())
            .map(|(k, _)| k)
            .collect();
        assert_eq!(ck.tensors.len(), expected.len(), "{file}");
        for t in &ck.tensors {
            assert_tensor_is(&ck, &f, &path, t, &want[&t.name]);
        }
        let get = |n: &str| ck.tensors.iter().find(|t| t.name == n).unwrap();
        assert_eq!(get("tied.a").storage, get("tied.b").storage);
        assert!(!get("transposed").is_contiguous());
    }
    // A whole module, pickled by class: refused, naming the class.
    let path = dir.join("module.bin");
    let f = std::fs::File::open(&path).unwrap();
    let e = TorchCheckpoint::read(&f, &path, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("refused global 'torch.nn.modules.linear.Linear'"), "{e}");
}

/// Pickle builders for hostile shapes: one FloatStorage '0' of `numel` elements, and
/// tensors over it as (name, offset, size, stride), in a legacy file holding the storage.
fn long(v: u64) -> Vec<u8> {
    assert!(v < 1 << 63, "eight bytes hold it as a non-negative int");
    let mut b = vec![0x8a, 8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

fn ints(v: &[u64]) -> Vec<u8> {
    let mut b = vec![b'('];
    for &x in v {
        b.extend(long(x));
    }
    b.push(b't');
    b
}

fn views_file(numel: u64, tensors: &[(&str, u64, Vec<u64>, Vec<u64>)]) -> Vec<u8> {
    let mut p = b"\x80\x02}".to_vec();
    for (name, offset, size, stride) in tensors {
        text(&mut p, name.as_bytes());
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu");
        p.extend(long(numel));
        p.extend_from_slice(b"NtQ");
        p.extend(long(*offset));
        p.extend(ints(size));
        p.extend(ints(stride));
        p.extend_from_slice(b"\x89}tRs");
    }
    p.push(b'.');
    let mut v = legacy(&p);
    v.truncate(v.len() - 4); // the empty key list `legacy` wrote
    v.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x000a.");
    v.extend_from_slice(&numel.to_le_bytes());
    v.extend(std::iter::repeat_n(0u8, numel as usize * 4));
    v
}

/// Findings of a red-team pass, each of which panicked, aborted, hung or expanded memory
/// before it was fixed; each is now an error naming what is wrong, quickly.
#[test]
fn red_team_shapes_are_refused_quickly() {
    // A valid file through the builder, so that the refusals below are about their point.
    let ok = read_bytes(&views_file(4, &[("w", 0, vec![2, 2], vec![2, 1])])).unwrap();
    assert_eq!(ck_names(&ok), ["w"]);
    for (tensors, want) in [
        // An empty tensor whose other dimensions overflow (was a panic in is_contiguous).
        (vec![("e", 0, vec![0, 1 << 33, 1 << 33], vec![0, 1 << 33, 1])], "element count overflows"),
        // 100 dimensions (a memoized 100,000-entry tuple made REDUCE quadratic).
        (vec![("d", 0, vec![1; 100], vec![1; 100])], "not a tuple of at most 64 non-negative ints"),
    ] {
        let (_, s) = kind(read_bytes(&views_file(4, &tensors)));
        assert!(s.contains(want), "{s}");
    }
    // 300 overlapping views of one storage: 300x the file, refused by max_expansion.
    let many: Vec<(String, u64, Vec<u64>, Vec<u64>)> =
        (0..300).map(|i| (format!("v{i}"), i as u64, vec![4096], vec![1])).collect();
    let many: Vec<(&str, u64, Vec<u64>, Vec<u64>)> =
        many.iter().map(|(n, o, a, b)| (n.as_str(), *o, a.clone(), b.clone())).collect();
    let (k, s) = kind(read_bytes(&views_file(4400, &many)));
    assert!(matches!(k, ErrorKind::Limit { setting: "max_expansion", .. }), "{s}");
    // An empty tensor far past its storage (was an overflow panic in planning): PyTorch
    // reads it (an empty tensor needs no storage), and so does tensorlift, at the start.
    let ck = read_bytes(&views_file(4, &[("e", 1 << 62, vec![0], vec![1])])).unwrap();
    assert_eq!((ck.tensors[0].shape.as_slice(), ck.tensors[0].storage_offset), (&[0][..], 0));
    // Empty dicts built and kept: the arena is bounded.
    let mut p = b"\x80\x02](".to_vec();
    p.extend(std::iter::repeat_n(b'}', 5000));
    p.extend_from_slice(b"e.");
    let limits = Limits::default().max_pickle_containers(1000);
    let e = TorchCheckpoint::read(&legacy(&p)[..], Path::new("d.bin"), &limits).unwrap_err();
    assert!(e.to_string().contains("max_pickle_containers"), "{e}");
}

/// One tensor, kept in the memo, under `names` names, of a storage whose key is `key_len`
/// bytes long: a legacy file.
fn one_tensor_many_names(names: usize, key_len: usize) -> Vec<u8> {
    let key = "k".repeat(key_len);
    let mut p = b"\x80\x02}(".to_vec();
    text(&mut p, b"n0");
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n");
    text(&mut p, key.as_bytes());
    p.extend_from_slice(b"X\x03\x00\x00\x00cpu");
    p.extend(long(4));
    p.extend_from_slice(b"NtQ");
    p.extend(long(0));
    p.extend(ints(&[4]));
    p.extend(ints(&[1]));
    p.extend_from_slice(b"\x89}tRq\x01");
    for i in 1..names {
        text(&mut p, format!("n{i}").as_bytes());
        p.extend_from_slice(b"h\x01");
    }
    p.extend_from_slice(b"u.");
    let mut v = legacy(&p);
    v.truncate(v.len() - 4); // the empty key list `legacy` wrote
    v.extend_from_slice(b"\x80\x02]");
    text(&mut v, key.as_bytes());
    v.extend_from_slice(b"a.");
    v.extend_from_slice(&4u64.to_le_bytes());
    v.extend_from_slice(&[0u8; 16]);
    v
}

/// The list of tensors copies each one's name, storage key and shape out of the pickle's
/// values, which may share them: a 60 KB key under 20,000 names would be 1.2 GB of copies
/// from a 0.3 MB file. They count against the pickle's memory budget.
#[test]
fn copies_of_shared_keys_count_against_the_pickles_budget() {
    let ck = read_bytes(&one_tensor_many_names(3, 60_000)).unwrap();
    assert_eq!(ck_names(&ck), ["n0", "n1", "n2"]);
    assert!(ck.tensors.iter().all(|t| t.storage.len() == 60_000 && t.shape == [4]));
    let (k, s) = kind(read_bytes(&one_tensor_many_names(20_000, 60_000)));
    assert!(matches!(k, ErrorKind::Limit { setting: "pickle_memory_per_byte", .. }), "{s}");
    assert!(s.contains("list of tensors"), "{s}");
}

/// A large list kept in the memo, made a set again and again by calls of a few bytes each:
/// each call checks every item (Python hashes them), so the work grew with the square of
/// the file. It is bounded by the pickle's length, and refused quickly.
#[test]
fn values_checked_again_and_again_are_refused_quickly() {
    // set (memo 0), a list of 100,000 ints (memo 1), then a list of set(list) calls.
    let mut p = b"\x80\x02cbuiltins\nset\nq\x00]q\x01(".to_vec();
    for i in 0..100_000u32 {
        p.push(b'J');
        p.extend_from_slice(&i.to_le_bytes());
    }
    p.extend_from_slice(b"e]");
    for _ in 0..20 {
        p.push(b'(');
        for _ in 0..1000 {
            p.extend_from_slice(b"h\x00h\x01\x85R");
        }
        p.push(b'e');
    }
    p.push(b'.');
    let started = std::time::Instant::now();
    let (k, s) = kind(read_bytes(&legacy(&p)));
    assert!(matches!(k, ErrorKind::Rescans { scanned, .. } if scanned > 1 << 24), "{s}");
    // (Not a timing test: a bound that holds on any machine, against hours unbounded.)
    assert!(started.elapsed() < std::time::Duration::from_secs(120), "{:?}", started.elapsed());
}

/// Found by an audit: a long string kept in the memo, set again and again as a dict's key
/// by calls of a few bytes each, was hashed whole each time (hours of CPU from a file of a
/// few hundred MB). The key's bytes count as items looked at, and the pickle is refused.
#[test]
fn a_long_key_set_again_and_again_is_refused() {
    // 1,500 strings of 255 bytes (the memory budget grows with the bytes read, so that it
    // holds a key of 4 MB), a dict (memo 0) of 8 short keys, then a key of 4 MB (memo 1),
    // then one SETITEMS of 20,000 times `key: 0` (h1 K0).
    let mut p = b"\x80\x02".to_vec();
    pad(&mut p, 1500);
    p.extend_from_slice(b"}q\x00(");
    for i in 0..8u8 {
        p.extend_from_slice(&[b'X', 1, 0, 0, 0, b'a' + i, b'K', i]);
    }
    p.push(b'u');
    text(&mut p, &[b'k'; 4 << 20]);
    p.extend_from_slice(b"q\x01h\x00(");
    for _ in 0..20_000 {
        p.extend_from_slice(b"h\x01K\x00");
    }
    p.extend_from_slice(b"u.");
    let (k, s) = kind(read_bytes(&legacy(&p)));
    assert!(matches!(k, ErrorKind::Rescans { .. }), "{s}");
}

/// Found by an audit: a legacy file's list of storage keys naming one long key again and
/// again (two bytes of pickle each time) was copied whole for each name before any was
/// checked: 500 GB from a 2 MB file. The keys are read where the pickle keeps them, and a
/// key listed twice is refused (torch.save lists each storage once).
#[test]
fn a_storage_key_listed_again_and_again_is_refused_without_copies() {
    let mut v = one_tensor_many_names(1, 1 << 20);
    // Replace the key list (`]`, the key, `a.`, then the storage) with 1,000 names of it (a
    // GB of copies before: enough to show, not so much that the old code is killed).
    let list_at = v.len() - (1 + 5 + (1 << 20) + 2) - 24;
    v.truncate(list_at);
    v.extend_from_slice(b"]q\x00(");
    text(&mut v, &[b'k'; 1 << 20]);
    v.extend_from_slice(b"q\x01");
    for _ in 0..1000 {
        v.extend_from_slice(b"h\x01");
    }
    v.extend_from_slice(b"e.");
    v.extend_from_slice(&4u64.to_le_bytes());
    v.extend_from_slice(&[0u8; 16]);
    let (k, s) = kind(read_bytes(&v));
    assert!(matches!(k, ErrorKind::NotTorch(_)), "{s}");
    assert!(s.ends_with("k' is listed twice"), "{}", &s[s.len().saturating_sub(200)..]);
    // Listed once, the same file reads.
    let ck = read_bytes(&one_tensor_many_names(1, 1 << 20)).unwrap();
    assert_eq!(ck_names(&ck), ["n0"]);
}

/// Found by an audit: tuples that share their items (2^16 of them from a hundred bytes of
/// pickle) made a set's items, many times over, were each walked whole (Python hashes
/// them) before the budget of checks was looked at: hours of CPU in one opcode. The budget
/// holds within the walk, and the pickle is refused close to it.
#[test]
fn shared_tuples_hashed_again_and_again_are_refused_within_the_budget() {
    // 40 KB of strings (they raise the memory budget, 16 bytes a byte read, for the list
    // below), a mark, then T0 = () and Ti = (Ti-1, Ti-1) in the memo up to T`depth`, closed
    // as one tuple; then set([T`depth`] * n). Trees of 2^16 items, and many trees of 2^10
    // (walks too short to reach a check of their own, were the walk's count checked).
    for (depth, n) in [(15u8, 2000), (9, 30_000)] {
        let mut p = b"\x80\x02](".to_vec();
        pad(&mut p, 160);
        p.extend_from_slice(b"e()q\x00");
        for i in 1..=depth {
            p.extend_from_slice(&[b'h', i - 1, b'h', i - 1, 0x86, b'q', i]);
        }
        p.extend_from_slice(b"tcbuiltins\nset\n](");
        for _ in 0..n {
            p.extend_from_slice(&[b'h', depth]);
        }
        p.extend_from_slice(b"e\x85R.");
        let file = legacy(&p);
        let (k, s) = kind(read_bytes(&file));
        let ErrorKind::Rescans { scanned, .. } = k else { panic!("{s}") };
        // The budget is 16 Mi items and 64 a byte read; the walks would be 131 M and 31 M.
        let most = (16u64 << 20) + 64 * file.len() as u64;
        assert!(scanned > 16 << 20 && scanned < most + 8, "{scanned} items looked at, at most {most} allowed");
    }
}

/// Found by an audit: `torch.device` of a long string kept in the memo, called many times by
/// a few bytes of pickle each, scanned the string each time. A name longer than any
/// device's is refused before it is looked at.
#[test]
fn a_long_device_name_is_refused_at_once() {
    let mut p = b"\x80\x02ctorch\ndevice\nq\x00".to_vec();
    text(&mut p, format!("cpu:{}", "0".repeat(1 << 20)).as_bytes());
    p.extend_from_slice(b"q\x01](");
    for _ in 0..100 {
        p.extend_from_slice(b"h\x00h\x01\x85R");
    }
    p.extend_from_slice(b"e.");
    let (_, s) = kind(read_bytes(&legacy(&p)));
    assert!(s.contains("torch.device with wrong arguments"), "{s}");
    // A device as torch.save writes it is read (here, as a state_dict's non-tensor value).
    let ck = read_bytes(&legacy(b"\x80\x02}X\x01\x00\x00\x00dctorch\ndevice\nX\x06\x00\x00\x00cuda:1\x85Rs.")).unwrap();
    assert_eq!(ck.skipped, ["d"]);
}

/// Found by an audit: a legacy persistent id's view key was copied (and compared) for each
/// id that named it, uncharged: a long view key kept in the memo, named by many ids of a
/// few bytes each, was copied again and again. Each id is charged for the keys it copies.
#[test]
fn a_long_view_key_named_again_and_again_counts_against_the_budget() {
    // Padding raises the budget (16 bytes a byte read), then one persistent id whose view
    // key is 256 KiB, kept in the memo and loaded 2,000 times.
    let mut p = b"\x80\x02](".to_vec();
    pad(&mut p, 4000);
    p.extend_from_slice(
        b"e(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x04\x00\x00\x00rootX\x03\x00\x00\x00cpuK\x04(",
    );
    text(&mut p, &[b'v'; 256 << 10]);
    p.extend_from_slice(b"K\x00K\x04ttq\x01](");
    for _ in 0..2000 {
        p.extend_from_slice(b"h\x01Q");
    }
    p.extend_from_slice(b"e.");
    let (k, s) = kind(read_bytes(&legacy(&p)));
    assert!(matches!(k, ErrorKind::Limit { setting: "pickle_memory_per_byte", .. }), "{s}");
}

/// Appends `s` as a pickle's `BINUNICODE` string: `X`, its length, its bytes.
fn text(p: &mut Vec<u8>, s: &[u8]) {
    p.push(b'X');
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s);
}

/// Appends `strings` strings of 255 bytes (`SHORT_BINSTRING`): bytes that raise the
/// memory budget (16 bytes a byte read) by more than the strings take.
fn pad(p: &mut Vec<u8>, strings: usize) {
    for _ in 0..strings {
        p.extend_from_slice(&[b'U', 255]);
        p.extend_from_slice(&[b'x'; 255]);
    }
}

fn ck_names(ck: &TorchCheckpoint) -> Vec<&str> {
    ck.tensors.iter().map(|t| t.name.as_str()).collect()
}

#[test]
fn zips_whose_entries_borrow_or_overlap_are_refused() {
    for (file, want) in [
        ("zip_alias.bin", "its local header names another entry"),
        ("zip_two_archives.bin", "outside the archive's folder"),
    ] {
        let (k, s) = kind(read(file));
        assert!(matches!(k, ErrorKind::Zip(_)), "{s}");
        assert!(s.contains(want), "{s}");
    }
}
