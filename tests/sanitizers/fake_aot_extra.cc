// TEST-ONLY: never part of the production kernel library (ms_xent/kernel_build.py compiles only
// ms_xent/csrc/*.cc). tests/sanitizers/run_kernels.py compiles this file into its own small
// library so that it can call the kernels' <Name>Init functions the way MindSpore does: with an
// AotExtra that holds attribute values (ignore_index, label_smoothing, weighted, ...).
//
// It implements the AotExtra interface of ms_xent/csrc/aot_abi.h (same header, same compiler and
// flags as the kernels, so the vtable layout matches) from C-callable setters, and owns the
// AotKernelData the kernel's Init stores in it (MindSpore frees it with the kernel; here the
// extra's destructor does).

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "aot_abi.h"

namespace {

class FakeAotExtra : public AotExtra {
 public:
  ~FakeAotExtra() override { delete KernelData(); }

  bool HasAttr(std::string name) override {
    return ints.count(name) || floats.count(name) || bools.count(name) || strings.count(name);
  }

  std::map<std::string, int64_t> ints;
  std::map<std::string, float> floats;
  std::map<std::string, bool> bools;
  std::map<std::string, std::string> strings;

 private:
  // A missing attribute throws std::out_of_range out of an extern "C" call: the runner dies loudly.
  bool GetAttrBool(std::string name) override { return bools.at(name); }
  int64_t GetAttrInt(std::string name) override { return ints.at(name); }
  float GetAttrFloat(std::string name) override { return floats.at(name); }
  std::string GetAttrStr(std::string name) override { return strings.at(name); }
  std::vector<int64_t> GetAttrIntVec(std::string) override { return {}; }
  std::vector<float> GetAttrFloatVec(std::string) override { return {}; }
  std::vector<std::vector<int64_t>> GetAttrInt2DVec(std::string) override { return {}; }
  std::vector<std::vector<float>> GetAttrFloat2DVec(std::string) override { return {}; }
};

FakeAotExtra *Cast(void *extra) {
  return static_cast<FakeAotExtra *>(static_cast<AotExtra *>(extra));
}

}  // namespace

// Returns an AotExtra* (as void*, the type the kernels' entry points take).
extern "C" void *MsXentTestNewExtra() { return static_cast<AotExtra *>(new FakeAotExtra); }

extern "C" void MsXentTestDeleteExtra(void *extra) { delete Cast(extra); }

extern "C" void MsXentTestSetInt(void *extra, const char *name, int64_t value) {
  Cast(extra)->ints[name] = value;
}

extern "C" void MsXentTestSetFloat(void *extra, const char *name, float value) {
  Cast(extra)->floats[name] = value;
}

extern "C" void MsXentTestSetBool(void *extra, const char *name, int value) {
  Cast(extra)->bools[name] = value != 0;
}

extern "C" void MsXentTestSetStr(void *extra, const char *name, const char *value) {
  Cast(extra)->strings[name] = value;
}
