// tensorlift from C++: a small RAII wrapper over the C API (handles freed by unique_ptr,
// failures as exceptions), then a load whose tensors are listed. Compiled and run by
// tests/capi.rs; docs/C_API.md shows where such a wrapper sits in a Triton-style backend.
//
//   load PATH [DEVICE]
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#include "tensorlift.h"

namespace tl {

struct Error : std::runtime_error {
    TlStatus status;
    Error(TlStatus s) : std::runtime_error(tl_last_error()), status(s) {}
};

inline void check(TlStatus s) {
    if (s != TL_STATUS_OK) throw Error(s);
}

template <typename T, void (*Free)(T *)>
using Handle = std::unique_ptr<T, std::integral_constant<decltype(Free), Free>>;

class Model {
  public:
    explicit Model(TlModel *m) : m_(m) {}
    size_t size() const { return tl_model_len(m_.get()); }
    TlTensorInfo operator[](size_t i) const {
        TlTensorInfo info;
        check(tl_model_tensor(m_.get(), i, &info));
        return info;
    }
    std::string stats() const {
        const char *json = nullptr;
        check(tl_model_stats_json(m_.get(), &json));
        return json;
    }

  private:
    Handle<TlModel, tl_model_free> m_;
};

class Loader {
  public:
    explicit Loader(const std::string &device = "auto") {
        TlOptions *o = nullptr;
        check(tl_options_new(&o));
        Handle<TlOptions, tl_options_free> options(o);
        check(tl_options_set_device(o, device.c_str()));
        TlLoader *l = nullptr;
        check(tl_loader_new(o, &l));
        l_.reset(l);
    }
    Model load(const std::string &path) const {
        TlModel *m = nullptr;
        check(tl_load(l_.get(), path.c_str(), &m));
        return Model(m);
    }

  private:
    Handle<TlLoader, tl_loader_free> l_;
};

}  // namespace tl

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: load PATH [DEVICE]\n");
        return 2;
    }
    // Built against this header, run with a library of its ABI.
    if (tl_abi_version() != TL_ABI_VERSION) {
        std::fprintf(stderr, "libtensorlift_c has ABI %u, this program was built for %u\n", tl_abi_version(),
                     TL_ABI_VERSION);
        return 2;
    }
    try {
        tl::Loader loader(argc > 2 ? argv[2] : "auto");
        tl::Model model = loader.load(argv[1]);
        unsigned long long total = 0;
        for (size_t i = 0; i < model.size(); i++) {
            TlTensorInfo t = model[i];
            std::printf("%s %s %llu bytes on %s\n", t.name, t.dtype, (unsigned long long)t.nbytes,
                        t.device_type == 1 ? "host" : "cuda");
            total += t.nbytes;
        }
        std::printf("%zu tensors, %llu bytes\n", model.size(), total);
        std::printf("%s\n", model.stats().c_str());
    } catch (const tl::Error &e) {
        std::fprintf(stderr, "error %d: %s\n", static_cast<int>(e.status), e.what());
        return 1;
    }
    return 0;
}
