//! `tensorlift doctor`: every run-time fact a load depends on, and what it would choose.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use tensorlift_cuda::CudaStatus;
use tensorlift_io::{direct_io_support, kernel_release, memlock, Memlock};

pub fn run(path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    // A path that does not exist is a mistake of the caller's, not a fact to report. A
    // remote one is planned (headers only): whether it can be reached is the fact.
    let remote = tensorlift::is_remote(path).then(|| remote_source(path));
    if remote.is_none() {
        std::fs::symlink_metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let cuda = tensorlift_cuda::cuda_status();
    // NCCL, which group loads of one process per GPU exchange slices over.
    let nccl = tensorlift_cuda::nccl::status();
    let nccl_version = |v: i32| format!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100);
    // What a load would choose, decided by the Loader itself (no second probe). A device it
    // cannot use is reported, never a failure of doctor: then the host's facts are shown.
    let (loader, refused) = match tensorlift::Loader::builder().build() {
        Ok(l) => (l, None),
        Err(e) => (tensorlift::Loader::builder().device(tensorlift::Device::Cpu).build()?, Some(e.to_string())),
    };
    let device_reason = refused.clone().unwrap_or_else(|| loader.device_reason().to_owned());
    let device_memory = loader.device_memory();
    let pinned = loader.pinned_staging();
    let io = loader.io_report();
    // A checkpoint file of the folder (a hub cache snapshot's blob, where its weights are
    // links into blobs/, which may be another file system), else the folder itself (a
    // scratch file made there).
    let direct = remote.is_none().then(|| direct_io_support(&residency_sample(path).unwrap_or_else(|| path.into())));
    let memlock = memlock();
    let pages = tensorlift_io::page_probe();
    let fill = tensorlift_io::fill::status();
    let residency = tensorlift_io::cache::residency_probe();
    // The checkpoint file (--path, or the first .safetensors file of a --path folder)
    // where the kernel hides which of its pages are cached (loads of such files read
    // buffered: see DirectIo::Auto).
    let hidden = remote.is_none().then(|| residency_sample(path)).flatten().filter(|file| {
        std::fs::File::open(file).is_ok_and(|f| {
            tensorlift_io::cache::resident_estimate(&f).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        })
    });
    let kernel = kernel_release().unwrap_or_else(|| "unknown".into());
    let limit = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), crate::text::memory);
    let budget = loader.settings().staging_budget as u64;
    // io_uring pins registered fixed buffers against RLIMIT_MEMLOCK (unless CAP_IPC_LOCK).
    let memlock_note = match memlock {
        _ if tensorlift_io::has_cap_ipc_lock() == Some(true) => {
            "not counted: the process holds CAP_IPC_LOCK (io_uring's fixed buffers are not charged to it)".to_owned()
        }
        Some(Memlock { soft: Some(soft), .. }) if soft < budget => format!(
            "below the {} staging budget: staging chunks cannot all be io_uring fixed buffers (reads still work, \
             each pinning its pages); raise it with `ulimit -l` or `--ulimit memlock=-1`",
            crate::text::memory(budget)
        ),
        Some(_) => format!("enough for the {} staging budget", crate::text::memory(budget)),
        None => "unknown".to_owned(),
    };
    // Why O_DIRECT could not be tried, in words a user can act on.
    let direct_why = |e: &tensorlift_io::IoError| {
        let denied = matches!(e, tensorlift_io::IoError::Open { source, .. }
            if matches!(source.raw_os_error(), Some(13 | 30)));
        if denied && path.is_dir() {
            format!(
                "{}: no .safetensors file there and no scratch file can be created ({e}); \
                 pass --path a checkpoint file, or a writable folder on the same file system",
                path.display()
            )
        } else {
            format!("{}: {e}", path.display())
        }
    };
    if json {
        let gpu = match cuda {
            CudaStatus::Available(d) => json!({
                "available": true,
                "driver_version": d.version_string(),
                "library": d.library.display().to_string(),
                "devices": d.devices.iter().map(|x| json!({
                    "ordinal": x.ordinal, "name": x.name, "memory_bytes": x.total_memory, "pci_bus_id": x.pci_bus_id,
                    "pcie_link": x.pcie_link.as_ref().map(|(s, w)| json!({"speed": s, "width": w})),
                    "pcie_link_max": x.pcie_link_max.as_ref().map(|(s, w)| json!({"speed": s, "width": w})),
                    "read_only_host_register": x.read_only_host_register,
                    "host_page_tables": x.host_page_tables,
                })).collect::<Vec<_>>(),
            }),
            CudaStatus::Unavailable(why) => json!({"available": false, "reason": why}),
        };
        let direct = match &direct {
            None => serde_json::Value::Null,
            Some(Ok(d)) => {
                json!({"path": path.display().to_string(), "tried": d.tried.display().to_string(), "supported": d.refused.is_none(),
                             "reason": d.refused, "offset_align": d.align.offset, "memory_align": d.align.memory})
            }
            Some(Err(e)) => json!({"path": path.display().to_string(), "supported": false, "reason": direct_why(e)}),
        };
        let v = json!({
            "kernel": kernel,
            "gpu": gpu,
            "nccl": match &nccl {
                Ok((library, v)) => json!({"available": true, "version": nccl_version(*v), "library": library.display().to_string()}),
                Err(why) => json!({"available": false, "reason": why}),
            },
            "io_uring": {"available": matches!(io.uring, tensorlift::UringStatus::Available), "status": io.uring.to_string()},
            "o_direct": direct,
            "remote": remote.as_ref().map(|r| &r.0),
            "page_cache_residency": {"cachestat": residency == tensorlift_io::cache::ResidencyProbe::Cachestat, "method": residency.to_string(), "hidden_for": hidden.as_ref().map(|p| p.display().to_string())},
            "host_pages": {"huge": loader.settings().huge_pages == tensorlift::HugePages::Always, "sample_favors_huge": pages.huge, "huge_first_touch_gbps": pages.huge_gbps, "base_first_touch_gbps": pages.base_gbps},
            "fill_by_copy": match &fill {
                Ok(()) => json!({"available": true}),
                Err(why) => json!({"available": false, "reason": why}),
            },
            "memlock": memlock.map(|Memlock { soft, hard }| json!({"soft_bytes": soft, "hard_bytes": hard, "note": memlock_note})),
            "would_use": {
                "device": if refused.is_some() { "none".to_owned() } else { loader.device().to_string() },
                "device_reason": device_reason,
                "device_memory": device_memory.map(|(free, total)| json!({"free_bytes": free, "total_bytes": total})),
                "pinned_staging_bytes": pinned,
                "fixed_buffers": format!("{:?}", io.fixed_buffers),
                "io": io.backend.to_string(),
                "io_reason": io.reason,
                "io_workers": loader.settings().io_workers,
                "prefault_threads": loader.settings().prefault_threads,
                "read_while_planning": loader.settings().read_while_planning.to_string(),
                "page_cache_dma": loader.settings().page_cache_dma,
            },
        });
        crate::text::write_json(out, &v)?;
        return Ok(());
    }
    writeln!(out, "kernel      Linux {kernel}")?;
    match cuda {
        CudaStatus::Available(d) => {
            writeln!(out, "gpu         CUDA driver {} ({})", d.version_string(), d.library.display())?;
            for x in &d.devices {
                // The current link runs slower while the GPU idles: the most it can run at beside.
                // A narrower link than the device's is no idle state: its slot or riser.
                let link = match (&x.pcie_link, &x.pcie_link_max) {
                    (Some((s, w)), Some((_, mw))) if w < mw => {
                        format!(", PCIe {s} x{w}: NARROWER than the device's x{mw} (check its slot)")
                    }
                    (Some((s, w)), Some((ms, mw))) if (s, w) != (ms, mw) => {
                        format!(", PCIe {s} x{w} now (idle links slow down), the device's most {ms} x{mw}")
                    }
                    (Some((s, w)), _) => format!(", PCIe {s} x{w}"),
                    (None, Some((ms, mw))) => format!(", PCIe up to {ms} x{mw}"),
                    (None, None) => String::new(),
                };
                let bus = x.pci_bus_id.as_deref().map_or_else(String::new, |b| format!(" at {b}"));
                writeln!(
                    out,
                    "            cuda:{} {}, {}{bus}{link}",
                    x.ordinal,
                    crate::text::printable(&x.name),
                    crate::text::memory(x.total_memory)
                )?;
                let dma = match x.read_only_host_register {
                    _ if x.host_page_tables == Some(true) => {
                        "warm shards read into staging (the device reads pageable memory through the host's page \
                         tables, where registering does not pin)"
                    }
                    _ if x.host_page_tables.is_none() => {
                        "warm shards read into staging (the driver does not say whether registering pins)"
                    }
                    Some(true) => "warm shards copy by DMA from the page cache (read-only registration)",
                    Some(false) => {
                        "warm shards read into staging (the device cannot register the page cache read-only)"
                    }
                    None => "read-only registration unknown (the driver did not say)",
                };
                writeln!(out, "              {dma}")?;
            }
        }
        CudaStatus::Unavailable(why) => writeln!(out, "gpu         none: {why}")?,
    }
    match &nccl {
        Ok((library, v)) => writeln!(out, "nccl        {} ({})", nccl_version(*v), library.display())?,
        Err(why) => writeln!(out, "nccl        none (group loads need it): {}", crate::text::printable(why))?,
    }
    writeln!(out, "io_uring    {}", io.uring)?;
    match &direct {
        None => {}
        Some(Ok(d)) => match &d.refused {
            None => writeln!(
                out,
                "O_DIRECT    works on {} (alignment: offsets {}, memory {})",
                crate::text::path(&d.tried),
                d.align.offset,
                d.align.memory
            )?,
            Some(why) => {
                let why = crate::text::printable(why);
                let tried = crate::text::path(&d.tried);
                writeln!(out, "O_DIRECT    not used on {tried}: {why}; reads go through the page cache")?
            }
        },
        Some(Err(e)) => writeln!(out, "O_DIRECT    cannot test {}", crate::text::printable(&direct_why(e)))?,
    }
    if let Some((_, line)) = &remote {
        writeln!(out, "remote      {}", crate::text::printable(line))?;
    }
    writeln!(out, "page cache  residency by {residency}")?;
    if let Some(tried) = &hidden {
        writeln!(
            out,
            "            not for {}: {} (such shards are read buffered)",
            crate::text::path(tried),
            tensorlift_io::cache::HIDDEN
        )?;
    }
    writeln!(
        out,
        "host pages  {} (a 32 MiB sample of fresh memory fills at {:.2} GB/s with huge pages, {:.2} GB/s with base \
         pages; huge pages only with --huge-pages always)",
        if loader.settings().huge_pages == tensorlift::HugePages::Always { "huge" } else { "base" },
        pages.huge_gbps,
        pages.base_gbps
    )?;
    match &fill {
        Ok(()) => writeln!(
            out,
            "fill        by copy: new host memory for cached shards is filled by copying their pages in \
             (userfaultfd, user-mode faults), never zeroed first"
        )?,
        Err(why) => writeln!(
            out,
            "fill        by reads (userfaultfd unavailable: {}): new host memory is zeroed, then read into",
            crate::text::printable(why)
        )?,
    }
    match memlock {
        Some(m) => writeln!(out, "memlock     soft {}, hard {}: {memlock_note}", limit(m.soft), limit(m.hard))?,
        None => writeln!(out, "memlock     unknown")?,
    }
    match &refused {
        Some(why) => writeln!(out, "would use   no device: {}", crate::text::printable(why))?,
        None => writeln!(out, "would use   device {} ({})", loader.device(), crate::text::printable(&device_reason))?,
    }
    if let Some((free, total)) = device_memory {
        writeln!(
            out,
            "            device memory {} free of {}",
            crate::text::memory(free),
            crate::text::memory(total)
        )?;
    }
    if let Some(p) = pinned {
        let fixed = match &io.fixed_buffers {
            tensorlift::FixedBuffers::Registered { .. } => "registered as io_uring fixed buffers".to_owned(),
            tensorlift::FixedBuffers::Refused(why) => format!("not io_uring fixed buffers: {why}"),
            _ => "not io_uring fixed buffers".to_owned(),
        };
        writeln!(out, "            pinned staging {} ({fixed})", crate::text::memory(p))?;
        let dma = if loader.settings().page_cache_dma {
            "on: ranges in the page cache go to the device by DMA, pinned read-only"
        } else {
            "off: every read goes through staging"
        };
        writeln!(out, "            page-cache DMA {dma}")?;
    }
    // Workers are io_uring rings; the pread fallback has a thread pool of its own.
    let workers = match io.backend {
        tensorlift::BackendKind::Uring => format!(", {} workers", loader.settings().io_workers),
        _ => String::new(),
    };
    writeln!(out, "            io {} ({}){workers}", io.backend, crate::text::printable(&io.reason))?;
    match loader.settings().prefault_threads {
        0 => writeln!(out, "            new host memory faulted in by the reads (prefault off)")?,
        n => writeln!(
            out,
            "            new host memory {}faulted in ahead of the reads by {n} thread(s) (MADV_POPULATE_WRITE)",
            if fill.is_ok() { "not filled by copy " } else { "" }
        )?,
    }
    let cpus = tensorlift::ReadWhilePlanning::AUTO_CPUS;
    let overlap = match loader.settings().read_while_planning {
        tensorlift::ReadWhilePlanning::Never => "never (each load plans first)".to_owned(),
        tensorlift::ReadWhilePlanning::Always => "always".to_owned(),
        _ if std::thread::available_parallelism().is_ok_and(|n| n.get() >= cpus) => {
            format!("auto: always here ({cpus} CPUs or more)")
        }
        _ => format!("auto: here for checkpoints not in the page cache (under {cpus} CPUs)"),
    };
    writeln!(out, "            read while planning (each shard once its header is validated): {overlap}")?;
    Ok(())
}

/// A file of the checkpoint at `path` to tell residency by: `path` itself, or the first by
/// name of the `.safetensors` files among a folder's first 10,000 entries (a bare `doctor`
/// looks at `.`, which may be a large folder).
fn residency_sample(path: &Path) -> Option<std::path::PathBuf> {
    if !path.is_dir() {
        return path.is_file().then(|| path.to_path_buf());
    }
    // A regular file of the folder, or one a link of it leads to where a load would follow
    // it (within the folder, or from a hub cache snapshot into its repository's blobs/).
    let folder = std::fs::canonicalize(path).ok()?;
    std::fs::read_dir(path)
        .ok()?
        .take(10_000)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|p| std::fs::canonicalize(&p).ok().filter(|real| real.is_file()).map(|real| (p, real)))
        .filter(|(_, real)| tensorlift_io::link_allowed(&folder, real))
        .min()
        .map(|(_, real)| real)
}

/// A remote checkpoint's facts: whether its headers can be read (planned), and how it would
/// be read; as JSON and as a line of text.
fn remote_source(path: &Path) -> (serde_json::Value, String) {
    let o = tensorlift::RemoteOptions::from_env();
    let how = format!(
        "ranged GETs of {} each, {} at once, {} retries, {:.0} s timeout",
        crate::text::memory(o.part_size()),
        o.concurrency,
        o.retries,
        o.timeout.as_secs_f64()
    );
    let mut v = json!({
        "url": tensorlift::redact_url(path).display().to_string(),
        "part_size_bytes": o.part_size(),
        "concurrency": o.concurrency,
        "retries": o.retries,
        "timeout_seconds": o.timeout.as_secs_f64(),
    });
    // The store itself, not a local copy of it: what a load without a cache would meet.
    let mut limits = tensorlift::PlanLimits::default();
    limits.remote.cache_dir = None;
    let line = match tensorlift_io::open_checkpoint(path, &limits) {
        Ok(plan) => {
            let tagged = (0..plan.shards().len()).all(|i| plan.remote_object(i).is_some_and(|o| o.e_tag().is_some()));
            v["reachable"] = json!(true);
            v["shards"] = json!(plan.shards().len());
            v["bytes"] = json!(plan.checkpoint_bytes());
            v["etags"] = json!(tagged);
            format!(
                "{}: {} shards, {} ({}; {how})",
                tensorlift::redact_url(path).display(),
                plan.shards().len(),
                crate::text::memory(plan.checkpoint_bytes()),
                if tagged {
                    "ETags: a changed object fails a load"
                } else {
                    "no ETags: lengths and modification times checked"
                }
            )
        }
        Err(e) => {
            v["reachable"] = json!(false);
            v["error"] = json!(e.to_string());
            format!("{}: cannot plan it: {e} ({how})", tensorlift::redact_url(path).display())
        }
    };
    (v, line)
}
