//! `candle-bert DIR [--device cuda:N]`: loads the BERT model in DIR through tensorlift and
//! through candle (on the host, or on candle's CUDA device N), runs both on the same input,
//! and exits 1 if their outputs differ.

use std::process::ExitCode;

use candle_core::Device;

fn device(arg: Option<&str>) -> Result<Device, String> {
    match arg {
        None | Some("cpu") => Ok(Device::Cpu),
        Some(d) => {
            let n = d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).ok_or(format!("unknown device {d:?}"))?;
            Device::new_cuda(n).map_err(|e| format!("cuda:{n}: {e}"))
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, dev) = match args.as_slice() {
        [dir] => (dir, None),
        [dir, flag, d] if flag == "--device" => (dir, Some(d.as_str())),
        _ => {
            eprintln!("usage: candle-bert DIR [--device cpu|cuda:N]   (DIR holds config.json and model.safetensors; see make_model.py)");
            return ExitCode::from(2);
        }
    };
    let device = match device(dev) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match candle_bert::compare_on(std::path::Path::new(dir), &device) {
        Ok(c) => {
            println!(
                "output {:?} on {:?}: largest difference {} (tensorlift {:?} the tensors to candle; its load {:.3} s, \
                 the model built on it {:.3} s; candle's own loader {:.3} s)",
                c.shape,
                device.location(),
                c.max_abs_diff,
                c.handover,
                c.tensorlift_secs,
                c.tensorlift_model_secs,
                c.candle_model_secs
            );
            if c.max_abs_diff == 0.0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
