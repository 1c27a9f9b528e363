// A CUDA device that exists only for autograd's bookkeeping, for `phitune plan` on a CPU-only PyTorch build.
//
// `phitune plan` runs a training step on FakeTensorMode tensors placed on "cuda": every op is answered from its meta
// kernel, nothing is computed or allocated. Forward needs no GPU, but backward does ask for one: the autograd engine
// takes the device guard of each tensor's device (streams, events) and asks at::accelerator for the current
// accelerator. On a CPU-only build neither exists and the process aborts ("PyTorch is not linked with support for
// cuda devices", then "Cannot access accelerator device when none is available").
// This library registers
//   - a device guard for DeviceType::CUDA with one device, one default stream and events that do nothing;
//   - CUDA hooks whose only claim is isBuilt(), so that at::accelerator names CUDA; isAvailable()/hasCUDA() stay
//     false, so torch.cuda.is_available() is still False and nothing tries to launch a kernel.
// The hooks registry is read once, when torch first asks for CUDA hooks (during `import torch`), so the library
// must be loaded with RTLD_GLOBAL before torch is imported: phitune.plan.fakegpu starts a fresh Python process that
// does exactly that. A CUDA build of torch needs none of this.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {

constexpr auto kCuda = c10::DeviceType::CUDA;

c10::Device only_device() { return c10::Device(kCuda, 0); }
c10::Stream only_stream() { return c10::Stream(c10::Stream::DEFAULT, only_device()); }

struct BookkeepingGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kCuda; }
  c10::Device exchangeDevice(c10::Device) const override { return only_device(); }
  c10::Device getDevice() const override { return only_device(); }
  void setDevice(c10::Device) const override {}
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device) const noexcept override { return only_stream(); }
  c10::Stream getDefaultStream(c10::Device) const override { return only_stream(); }
  c10::Stream getNewStream(c10::Device, int) const override { return only_stream(); }
  c10::Stream getStreamFromGlobalPool(c10::Device, bool) const override { return only_stream(); }
  c10::Stream exchangeStream(c10::Stream) const noexcept override { return only_stream(); }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  // Events and synchronisation: there is no work in flight, so everything is already complete.
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
  void recordDataPtrOnStream(const c10::DataPtr&, const c10::Stream&) const override {}
};

struct BuiltButAbsentHooks : at::CUDAHooksInterface {
  explicit BuiltButAbsentHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
};

struct RegisterGuard {
  RegisterGuard() {
    if (!c10::impl::hasDeviceGuardImpl(kCuda)) {
      static BookkeepingGuard guard;
      c10::impl::registerDeviceGuard(kCuda, &guard);
    }
  }
} register_guard;

}  // namespace

namespace at {
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, BuiltButAbsentHooks)
}  // namespace at
