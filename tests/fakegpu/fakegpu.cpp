// A second device, "fakegpu" (PyTorch's PrivateUse1 key), whose memory is host memory and whose
// kernels are the CPU's, but whose device type is not `cpu`: on a CPU-only machine a host tensor
// meeting a device tensor in an op then fails as it does on CUDA. Test-only (tests/fakegpu).
//
// What a device needs (see pytorch's test/cpp_extensions/open_registration_extension):
// an allocator, a device guard, hooks (autograd and generators ask for them), the factory and copy
// ops, the view/storage ops a boxed fallback cannot run, and a fallback for every other op, which
// runs the CPU kernel on the device tensors' own memory.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/Resize.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_fused_sdp_choice_cpu_dispatch.h>
#include <ATen/ops/as_strided_cpu_dispatch.h>
#include <ATen/ops/set_cpu_dispatch.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <cstring>

namespace {
constexpr c10::DeviceType kFake = c10::DeviceType::PrivateUse1;
const c10::Device kDevice(kFake, 0);  // one device: every rank uses fakegpu:0

struct Allocator final : at::Allocator {
  at::DataPtr allocate(size_t nbytes) override {
    void* data = nbytes ? c10::alloc_cpu(nbytes) : nullptr;
    return {data, data, &c10::free_cpu, kDevice};
  }
  at::DeleterFnPtr raw_deleter() const override { return &c10::free_cpu; }
  void copy_data(void* dest, const void* src, std::size_t n) const override { std::memcpy(dest, src, n); }
};
Allocator g_allocator;
REGISTER_ALLOCATOR(kFake, &g_allocator);

// One device, one (synchronous) stream: nothing to switch, record or wait for.
struct Guard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kFake; }
  c10::Device exchangeDevice(c10::Device) const override { return kDevice; }
  c10::Device getDevice() const override { return kDevice; }
  void setDevice(c10::Device) const override {}
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device d) const noexcept override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const noexcept override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
};
C10_REGISTER_GUARD_IMPL(PrivateUse1, Guard);

// Random numbers come from the CPU generator, so a fake-device run draws what a CPU run draws.
struct Hooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();
  }
  at::Device getDeviceFromPtr(void*) const override { return kDevice; }
  // `.to("cpu", non_blocking=True)` stages through "pinned" host memory: plain host memory here
  at::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t bytes) const override {
    at::native::resize_bytes_cpu(storage.unsafeGetStorageImpl(), bytes);
  }
};
struct RegisterHooks {
  RegisterHooks() { at::RegisterPrivateUse1HooksInterface(new Hooks()); }
} g_register_hooks;

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout>, std::optional<c10::Device>, std::optional<bool>,
                               std::optional<c10::MemoryFormat> format) {
  return at::detail::empty_generic(size, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout>, std::optional<c10::Device>, std::optional<bool>) {
  return at::detail::empty_strided_generic(size, stride, &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

// The same memory, strides and offset seen as a CPU tensor: CPU kernels run on it as they would on
// the CPU, on the same layout and without copies (at::native::cpu_fallback copies every argument
// and makes non-dense ones contiguous, which may change a kernel's path and its rounding).
// A resizable alias (for out= arguments) reallocates on resize; the caller then copies back.
at::Tensor host_alias(const at::Tensor& t, bool resizable = false) {
  const c10::Storage& storage = t.storage();
  c10::DataPtr data(storage.mutable_data(), nullptr, &c10::detail::deleteNothing, at::Device(at::kCPU));
  c10::Storage host(c10::Storage::use_byte_size_t(), storage.nbytes(), std::move(data),
                    resizable ? c10::GetCPUAllocator() : nullptr, resizable);
  auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(host), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                   t.dtype());
  impl->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  return at::Tensor(std::move(impl));
}

// A CPU kernel's fresh output as a device tensor, without a copy (the device storage owns it).
at::Tensor device_wrap(const at::Tensor& out) {
  auto* owner = new c10::Storage(out.storage());
  c10::DataPtr data(owner->mutable_data(), owner, [](void* ctx) { delete static_cast<c10::Storage*>(ctx); },
                    kDevice);
  c10::Storage storage(c10::Storage::use_byte_size_t(), owner->nbytes(), std::move(data), &g_allocator, true);
  auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(storage),
                                                   c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), out.dtype());
  impl->set_sizes_and_strides(out.sizes(), out.strides(), out.storage_offset());
  return at::Tensor(std::move(impl));
}

// Host <-> device and device <-> device copies (`.to()`, `.cpu()`, `copy_`): both sides are host memory.
at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool) {
  at::Tensor to = dst.is_cpu() ? dst : host_alias(dst);
  to.copy_(self.is_cpu() ? self : host_alias(self));
  return dst;
}
at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  at::native::resize_(dst, self.sizes());
  return copy_from(self, dst, false);
}

// Views and storage ops act on the device tensor's own storage (the fallback below hands back new
// tensors; it maps views of an argument through as_strided).
at::Tensor as_strided(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride,
                      std::optional<int64_t> offset) {
  return at::cpu::as_strided(self, size, stride, offset);
}
const at::Tensor& resize(const at::Tensor& self, c10::IntArrayRef size, std::optional<c10::MemoryFormat> format) {
  return at::native::resize_(self, size, format);
}
at::Scalar local_scalar_dense(const at::Tensor& self) { return at::_local_scalar_dense(host_alias(self)); }
at::Tensor& set_storage_offset(at::Tensor& self, at::Storage source, int64_t offset, c10::IntArrayRef size,
                               c10::IntArrayRef stride) {
  return at::cpu::set_(self, source, offset, size, stride);
}
at::Tensor& set_storage(at::Tensor& self, at::Storage source) { return at::cpu::set_(self, source); }
at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) { return at::cpu::set_(self, source); }

// scaled_dot_product_attention: the kernel the CPU would pick (its flash kernel, run through the
// fallback below), not the math path that devices without a choice get, so that results are the CPU's.
at::Tensor host_alias_like(const at::Tensor& t) {
  at::Tensor alias = host_alias(t);
  return t.requires_grad() ? alias.requires_grad_() : alias;
}
int64_t fused_sdp_choice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask, double dropout, bool causal,
                         std::optional<double> scale, bool gqa) {
  std::optional<at::Tensor> host_mask;
  if (mask.has_value()) host_mask = mask->is_cpu() ? *mask : host_alias_like(*mask);
  return at::cpu::_fused_sdp_choice(host_alias_like(q), host_alias_like(k), host_alias_like(v), host_mask,
                                    dropout, causal, scale, gqa);
}
}  // namespace
namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &fused_sdp_choice)
}  // namespace at::native
namespace {

// CUDA's rule for an op's tensor arguments: all on one device, except 0-dim host tensors (scalars)
// and host index tensors of indexing (CUDA moves those itself).
bool host_arguments_allowed(const std::string& op) {
  return op == "aten::index" || op == "aten::index_put_" || op == "aten::_index_put_impl_" ||
         op == "aten::index_put";
}

void refuse_host_tensors(const c10::FunctionSchema& schema, torch::jit::Stack* stack, size_t first) {
  const auto& arguments = schema.arguments();
  bool on_device = false;
  std::string host;  // the first host argument's name
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    auto visit = [&](const at::Tensor& t) {
      if (!t.defined()) return;
      if (t.device().type() == kFake) on_device = true;
      else if (t.is_cpu() && t.dim() > 0 && host.empty()) host = arguments[i].name();
    };
    if (value.isTensor()) visit(value.toTensor());
    else if (value.isTensorList()) for (const at::Tensor& t : value.toTensorList()) visit(t);
    else if (value.isOptionalTensorList())
      for (const std::optional<at::Tensor> t : value.toOptionalTensorList()) if (t.has_value()) visit(*t);
  }
  TORCH_CHECK(!on_device || host.empty() || host_arguments_allowed(schema.name()),
              "Expected all tensors to be on the same device, but found at least two devices, fakegpu:0 and cpu! "
              "(host tensor argument '", host, "' of ", schema.name(), ")");
}

bool is_device(const at::Tensor& t) { return t.defined() && t.device().type() == kFake; }
bool writes(const c10::Argument& argument) { return argument.alias_info() && argument.alias_info()->isWrite(); }

// A CPU kernel's output as a device tensor: a view of a device argument stays a view of it.
at::Tensor to_device(const at::Tensor& out, const std::vector<at::Tensor>& device_arguments) {
  if (!out.defined() || !out.is_cpu()) return out;
  const char* data = static_cast<const char*>(out.storage().data());
  for (const at::Tensor& argument : device_arguments) {
    const char* base = static_cast<const char*>(argument.storage().data());
    if (data && base && data >= base && data < base + argument.storage().nbytes() &&
        out.dtype() == argument.dtype()) {
      int64_t offset = (data - base) / out.element_size() + out.storage_offset();
      return at::cpu::as_strided(argument, out.sizes(), out.strides(), offset);
    }
  }
  return device_wrap(out);
}

// Every other op: refuse a host tensor mixed with device tensors (as CUDA does), then run the CPU
// kernel on host aliases of the device tensors and hand its outputs back as device tensors.
void strict_cpu_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& arguments = schema.arguments();
  const size_t first = stack->size() - arguments.size();
  refuse_host_tensors(schema, stack, first);

  std::vector<c10::IValue> given(stack->begin() + first, stack->end());
  std::vector<at::Tensor> device_arguments;
  std::vector<std::pair<at::Tensor, at::Tensor>> written;  // (device argument, its resizable alias)
  auto alias = [&](const at::Tensor& t) { device_arguments.push_back(t); return host_alias(t); };
  for (size_t i = 0; i < arguments.size(); ++i) {
    c10::IValue& value = (*stack)[first + i];
    if (value.isTensor() && is_device(value.toTensor())) {
      const at::Tensor t = value.toTensor();
      if (writes(arguments[i])) {
        written.emplace_back(t, host_alias(t, true));
        device_arguments.push_back(t);
        value = written.back().second;
      } else {
        value = alias(t);
      }
    } else if (value.isTensorList()) {
      c10::List<at::Tensor> list;
      for (const at::Tensor& t : value.toTensorList()) list.push_back(is_device(t) ? alias(t) : t);
      value = list;
    } else if (value.isOptionalTensorList()) {
      c10::List<std::optional<at::Tensor>> list;
      for (const std::optional<at::Tensor> t : value.toOptionalTensorList())
        list.push_back(t.has_value() && is_device(*t) ? std::optional<at::Tensor>(alias(*t)) : t);
      value = list;
    } else if (value.isDevice() && value.toDevice().type() == kFake) {
      value = c10::IValue(at::Device(at::kCPU));
    }
  }

  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);

  for (auto& [t, host] : written) {  // an out= argument the kernel resized: resize and fill the device one
    if (host.data_ptr() != t.data_ptr() || !host.sizes().equals(t.sizes())) {
      at::native::resize_(t, host.sizes());
      copy_from(host, t, false);
    }
  }
  const auto& returns = schema.returns();
  const size_t first_return = stack->size() - returns.size();
  for (size_t r = 0; r < returns.size(); ++r) {
    c10::IValue& value = (*stack)[first_return + r];
    if (returns[r].alias_info() && returns[r].alias_info()->isWrite()) {  // in-place / out=: the argument itself
      for (size_t i = 0; i < arguments.size(); ++i) {
        if (arguments[i].alias_info() && *arguments[i].alias_info() == *returns[r].alias_info()) {
          value = given[i];
          break;
        }
      }
    } else if (value.isTensor()) {
      value = to_device(value.toTensor(), device_arguments);
    } else if (value.isTensorList()) {
      c10::List<at::Tensor> list;
      for (const at::Tensor& t : value.toTensorList()) list.push_back(to_device(t, device_arguments));
      value = list;
    }
  }
}
}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("as_strided", as_strided);
  m.impl("view", at::native::view);
  m.impl("_reshape_alias", at::native::_reshape_alias);
  m.impl("resize_", resize);
  m.impl("_local_scalar_dense", local_scalar_dense);
  m.impl("set_.source_Storage_storage_offset", set_storage_offset);
  m.impl("set_.source_Storage", set_storage);
  m.impl("set_.source_Tensor", set_tensor);
}

// Ops with both a CPU kernel and a decomposition (CompositeImplicitAutograd) for other backends: a
// device without its own kernel would run the decomposition, which rounds differently from the CPU
// kernel (the only three such aten ops in torch 2.13). Here they take the CPU kernel, as on the CPU.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  for (const char* op : {"silu_backward", "mish_backward", "native_channel_shuffle"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&strict_cpu_fallback>());
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&strict_cpu_fallback>());
}

