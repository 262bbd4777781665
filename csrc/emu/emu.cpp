// The emulator's runtime: fibers, the block scheduler, barriers, warp collectives, shared memory,
// the emulated stream, its allocators and the launch log (see emu.h for the model).
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <sstream>
#include <unordered_map>

#if defined(__SANITIZE_ADDRESS__)
#define PSI_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PSI_EMU_ASAN 1
#endif
#endif
#ifdef PSI_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "emu.h"

// ---- context switch ----------------------------------------------------------------------------
// x86-64 System V: saves the callee-saved registers, MXCSR and the x87 control word on the old
// stack, stores the stack pointer in *save, loads `next` and restores the same from there.
#if defined(__x86_64__)
extern "C" void psi_emu_switch(void** save, void* next);
extern "C" void psi_emu_trampoline();
asm(R"(
  .text
  .globl psi_emu_switch
  .type psi_emu_switch,@function
psi_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size psi_emu_switch, .-psi_emu_switch

  .globl psi_emu_trampoline
  .type psi_emu_trampoline,@function
psi_emu_trampoline:
  movq %r12, %rdi
  andq $-16, %rsp
  callq *%r13
  ud2
  .size psi_emu_trampoline, .-psi_emu_trampoline
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

namespace psi {
namespace emu {

uint3 g_thread_idx{0, 0, 0}, g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;
#ifdef PSI_EMU_ASAN
constexpr size_t kStackBytes = 1024 * 1024;  // ASan's redzones make frames several times larger
#else
constexpr size_t kStackBytes = 256 * 1024;
#endif

std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// ---- fibers ------------------------------------------------------------------------------------

struct Fiber {
  enum State { kReady, kBarrier, kWarp, kDone };
  State state = kDone;
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable byte (a PROT_NONE guard page lies below it)
  unsigned tid = 0;
  uint3 idx{0, 0, 0};
  const char* file = nullptr;  // the __syncthreads() call it waits at
  int line = 0;
  // The warp collective it waits in.
  unsigned mask = 0;
  int op = 0, arg = 0, width = 32;
  size_t bytes = 0;
  unsigned char in[64], out[64];
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
};

// The state of the block being run (one at a time, on the thread holding g_op_mutex).
struct BlockRun {
  std::vector<Fiber> fibers;
  unsigned n = 0;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  const std::function<void()>* body = nullptr;
  std::string kernel;
  bool failed = false;
  std::string error;
  std::vector<std::pair<void*, size_t>> shared;
  size_t shared_bytes = 0;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
};
BlockRun R;

Order g_order = Order::kForward;
uint64_t g_seed = 0;
std::mt19937_64 g_rng;

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "emulator: cannot map a fiber stack");
  TORCH_CHECK(mprotect(p, page, PROT_NONE) == 0, "emulator: cannot protect a stack guard page");
  return static_cast<char*>(p) + page;
}

void resume(Fiber* f) {
  R.cur = f;
  g_thread_idx = f->idx;
#ifdef PSI_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack, kStackBytes);
#endif
#if defined(__x86_64__)
  psi_emu_switch(&R.sched_sp, f->sp);
#else
  swapcontext(&R.sched_ctx, &f->ctx);
#endif
#ifdef PSI_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  R.cur = nullptr;
}

// Back to the scheduler; `final`: this fiber is never resumed.
void yield(Fiber* f, bool final) {
#ifdef PSI_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(final ? nullptr : &fake, R.sched_stack_bottom,
                                 R.sched_stack_size);
#endif
#if defined(__x86_64__)
  psi_emu_switch(&f->sp, R.sched_sp);
#else
  swapcontext(&f->ctx, &R.sched_ctx);
#endif
#ifdef PSI_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, &R.sched_stack_bottom, &R.sched_stack_size);
#endif
  (void)final;
}

void fiber_main(Fiber* f) {
#ifdef PSI_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &R.sched_stack_bottom, &R.sched_stack_size);
#endif
  try {
    (*R.body)();
  } catch (const std::exception& e) {
    R.failed = true;
    R.error = std::string("exception in device code: ") + e.what();
  }
  f->state = Fiber::kDone;
  yield(f, true);
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_main_ucontext(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

// Set when a block ends in an error: its fibers were abandoned with live frames, whose ASan
// shadow (stack redzones) must be cleared before any stack is reused (run_block).
bool g_stacks_dirty = false;

void start_fiber(Fiber& f) {
#ifdef PSI_EMU_ASAN
  // The previous fiber on this stack ended inside fiber_main and yield, whose frames never
  // return: their redzones stay poisoned where the first frame of this fiber is written.
  constexpr size_t kTop = 16 * 1024;
  __asan_unpoison_memory_region(f.stack + kStackBytes - kTop, kTop);
#endif
#if defined(__x86_64__)
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
  uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack + kStackBytes) - 2;
  *--sp = reinterpret_cast<uint64_t>(&psi_emu_trampoline);  // ret
  *--sp = 0;                                                  // rbp
  *--sp = 0;                                                  // rbx
  *--sp = reinterpret_cast<uint64_t>(&f);                     // r12: the argument
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);            // r13: the entry
  *--sp = 0;                                                  // r14
  *--sp = 0;                                                  // r15
  uint64_t csr_word;
  std::memcpy(&csr_word, csr, sizeof(csr_word));
  *--sp = csr_word;  // MXCSR, x87 control word
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  const uintptr_t a = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main_ucontext), 2,
              static_cast<unsigned>(a >> 32), static_cast<unsigned>(a & 0xffffffffu));
#endif
  f.state = Fiber::kReady;
}

std::string where(const Fiber* f) {
  std::ostringstream s;
  s << "kernel " << R.kernel << ", block (" << g_block_idx.x << ", " << g_block_idx.y << ", "
    << g_block_idx.z << ")";
  if (f != nullptr) {
    s << ", thread (" << f->idx.x << ", " << f->idx.y << ", " << f->idx.z << ")";
  }
  return s.str();
}

// ---- warp collectives --------------------------------------------------------------------------

[[noreturn]] void block_error(const std::string& what) {
  g_stacks_dirty = true;
  throw std::runtime_error("emulated CUDA: " + where(nullptr) + ": " + what);
}

std::string mask_str(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof(b), "0x%08x", m);
  return b;
}

// Completes the collectives whose lanes have all arrived. Returns whether any completed.
bool release_warps() {
  bool progress = false;
  const unsigned warps = (R.n + 31) / 32;
  for (unsigned w = 0; w < warps; ++w) {
    const unsigned base = w * 32, lanes = std::min(32u, R.n - base);
    for (unsigned l = 0; l < lanes; ++l) {
      Fiber& f = R.fibers[base + l];
      if (f.state != Fiber::kWarp) continue;
      const unsigned m = f.mask;
      bool complete = true;
      for (unsigned k = 0; k < lanes && complete; ++k) {
        if (!((m >> k) & 1u)) continue;
        const Fiber& o = R.fibers[base + k];
        if (o.state == Fiber::kDone) {
          block_error("a warp collective with mask " + mask_str(m) + " waits for lane " +
                      std::to_string(k) + ", which has exited");
        }
        if (o.state != Fiber::kWarp) {
          complete = false;
        } else if (o.mask != m || o.op != f.op || o.width != f.width || o.bytes != f.bytes) {
          complete = false;  // a mismatch is reported if nothing else can move
        }
      }
      if (!complete) continue;
      for (unsigned k = 0; k < lanes; ++k) {
        if (!((m >> k) & 1u)) continue;
        Fiber& o = R.fibers[base + k];
        const int width = o.width;
        const unsigned seg = (k / width) * width;
        unsigned src = k;
        switch (o.op) {
          case kShflIdx: src = seg + static_cast<unsigned>(o.arg) % width; break;
          case kShflUp: src = k >= seg + o.arg ? k - o.arg : k; break;
          case kShflDown: src = k + o.arg < seg + width ? k + o.arg : k; break;
          case kShflXor: {
            const unsigned x = k ^ static_cast<unsigned>(o.arg);
            src = x < seg + width ? x : k;
            break;
          }
          default: break;
        }
        if (o.op == kBallot) {
          unsigned bits = 0;
          for (unsigned j = 0; j < lanes; ++j) {
            int p;
            std::memcpy(&p, R.fibers[base + j].in, sizeof(p));
            if (((m >> j) & 1u) && p != 0) bits |= 1u << j;
          }
          std::memcpy(o.out, &bits, sizeof(bits));
        } else if (o.op != kSyncWarp) {
          if (src >= lanes || !((m >> src) & 1u)) {
            block_error("lane " + std::to_string(k) + " of warp " + std::to_string(w) +
                        " reads lane " + std::to_string(src) + ", outside the mask " +
                        mask_str(m));
          }
          std::memcpy(o.out, R.fibers[base + src].in, o.bytes);
        }
      }
      for (unsigned k = 0; k < lanes; ++k) {
        if ((m >> k) & 1u) R.fibers[base + k].state = Fiber::kReady;
      }
      progress = true;
    }
  }
  return progress;
}

// Runs one block of R.n threads; throws on a device error, a deadlock or a divergent barrier.
void run_block() {
  if (R.fibers.size() < R.n) {
    const size_t old = R.fibers.size();
    R.fibers.resize(R.n);
    for (size_t i = old; i < R.n; ++i) R.fibers[i].stack = new_stack();
  }
#ifdef PSI_EMU_ASAN
  if (g_stacks_dirty) {  // an abandoned block may have left poison anywhere on any stack
    for (const Fiber& f : R.fibers) __asan_unpoison_memory_region(f.stack, kStackBytes);
  }
#endif
  for (unsigned t = 0; t < R.n; ++t) {
    Fiber& f = R.fibers[t];
    f.tid = t;
    f.idx = uint3{t % g_block_dim.x, (t / g_block_dim.x) % g_block_dim.y,
                  t / (g_block_dim.x * g_block_dim.y)};
    start_fiber(f);
  }
  g_stacks_dirty = false;
  R.shared.clear();
  R.failed = false;
  std::vector<unsigned> order(R.n);
  for (;;) {
    for (unsigned t = 0; t < R.n; ++t) order[t] = t;
    if (g_order == Order::kReverse) {
      std::reverse(order.begin(), order.end());
    } else if (g_order == Order::kRandom) {
      std::shuffle(order.begin(), order.end(), g_rng);
    }
    for (unsigned t : order) {
      Fiber& f = R.fibers[t];
      if (f.state != Fiber::kReady) continue;
      resume(&f);
      if (R.failed) {
        g_stacks_dirty = true;
        throw std::runtime_error("emulated CUDA: " + where(&f) + ": " + R.error);
      }
    }
    if (release_warps()) continue;
    unsigned done = 0, barrier = 0, warp = 0;
    for (unsigned t = 0; t < R.n; ++t) {
      done += R.fibers[t].state == Fiber::kDone;
      barrier += R.fibers[t].state == Fiber::kBarrier;
      warp += R.fibers[t].state == Fiber::kWarp;
    }
    if (done == R.n) return;
    if (warp == 0) {  // barrier > 0
      if (done > 0) {
        block_error("__syncthreads() reached by " + std::to_string(barrier) + " threads after " +
                    std::to_string(done) + " threads of the block exited");
      }
      const Fiber& first = R.fibers[0];
      for (unsigned t = 1; t < R.n; ++t) {
        const Fiber& f = R.fibers[t];
        if (f.line != first.line || std::strcmp(f.file, first.file) != 0) {
          block_error("threads 0 and " + std::to_string(t) + " wait at different __syncthreads() "
                      "calls (" + first.file + ":" + std::to_string(first.line) + " and " +
                      f.file + ":" + std::to_string(f.line) + ")");
        }
      }
      for (unsigned t = 0; t < R.n; ++t) R.fibers[t].state = Fiber::kReady;
      continue;
    }
    std::ostringstream s;
    s << "deadlock: " << warp << " threads wait in warp collectives, " << barrier
      << " at __syncthreads(), " << done << " exited;";
    for (unsigned t = 0; t < R.n; ++t) {
      const Fiber& f = R.fibers[t];
      if (f.state == Fiber::kWarp) {
        s << " lane " << t % 32 << " of warp " << t / 32 << " waits with mask "
          << mask_str(f.mask) << " (op " << f.op << ");";
        break;
      }
    }
    block_error(s.str());
  }
}

// ---- the stream, its allocators, the log -------------------------------------------------------

std::mutex g_op_mutex;
std::vector<LaunchRecord> g_log;
bool g_capture = false;

}  // namespace

struct Stream {
  std::vector<std::function<void()>> queue;
};

namespace {

Stream g_stream;

// Memory the host frees during an op stays valid until the stream has run (the caching
// allocator's stream order); freed for real after the flush.
std::mutex g_free_mutex;
bool g_in_op = false;
std::vector<void*> g_deferred;
c10::Allocator* g_host_allocator = nullptr;  // the CPU allocator outside emulated ops

void deferred_free(void* p) {
  {
    const std::lock_guard<std::mutex> lock(g_free_mutex);
    if (g_in_op) {
      g_deferred.push_back(p);
      return;
    }
  }
  std::free(p);
}

int64_t g_allocations = 0;  // device allocations made by the current op (device_allocations)

struct StreamOrderedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    ++g_allocations;
    const size_t bytes = (std::max<size_t>(n, 1) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "emulator: out of memory allocating ", n, " bytes");
    return {p, p, &deferred_free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &deferred_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};
StreamOrderedAllocator g_device_allocator;

// Pinned host blocks: poisoned when freed, unless a queued copy still reads them (then poisoned
// once that copy has run), so a copy that reads a block the host gave back reads poison.
struct PinnedBlock {
  size_t bytes = 0;
  int pending = 0;
  bool freed = false;
};
std::unordered_map<void*, PinnedBlock> g_pinned;

// A released block is poisoned and held until the op ends (then freed), so a copy that reads it
// too late reads 0xFF bytes, deterministically, rather than freed memory.
std::vector<void*> g_quarantine;

void release_pinned(void* p) {
  auto it = g_pinned.find(p);
  std::memset(p, 0xFF, it->second.bytes);
  g_quarantine.push_back(p);
  g_pinned.erase(it);
}

void pinned_free(void* p) {
  auto it = g_pinned.find(p);
  TORCH_INTERNAL_ASSERT(it != g_pinned.end(), "emulator: unknown pinned block");
  if (it->second.pending > 0) {
    it->second.freed = true;
  } else {
    release_pinned(p);
  }
}

void flush(Stream* s) {
  std::vector<std::function<void()>> queue;
  queue.swap(s->queue);
  for (auto& task : queue) task();
}

}  // namespace

Stream* current_stream() { return &g_stream; }
bool is_capturing(Stream*) { return g_capture; }

void enqueue_launch(Stream* s, const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
                    std::function<void()> body) {
  std::string k(name);
  while (!k.empty() && (k.front() == '(' || k.front() == ' ')) k.erase(k.begin());
  while (!k.empty() && (k.back() == ')' || k.back() == ' ')) k.pop_back();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const bool ok = block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 &&
                  block.y <= 1024 && block.z <= 64 && threads <= kMaxThreads && grid.x >= 1 &&
                  grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535;
  TORCH_CHECK(ok, "emulated CUDA launch of ", k, ": invalid configuration argument (grid ",
              dim_str(grid), ", block ", dim_str(block), ")");
  TORCH_CHECK(dynamic_smem <= kMaxSharedBytes, "emulated CUDA launch of ", k, ": ", dynamic_smem,
              " bytes of dynamic shared memory (at most ", kMaxSharedBytes, ")");
  g_log.push_back(LaunchRecord{k, grid, block, dynamic_smem});
  const size_t index = g_log.size() - 1;
  s->queue.push_back([k, grid, block, dynamic_smem, index, body = std::move(body)] {
    const size_t statics = run_grid(k.c_str(), grid, block, body);
    const size_t total = statics + dynamic_smem;
    if (index < g_log.size()) g_log[index].shared_bytes = total;
    TORCH_CHECK(total <= kMaxSharedBytes, "emulated CUDA launch of ", k, ": ", total,
                " bytes of shared memory (at most ", kMaxSharedBytes, ")");
  });
}

void enqueue_task(Stream* s, std::function<void()> task) { s->queue.push_back(std::move(task)); }

at::Tensor pinned_empty_words(int64_t n, Stream* s) {
  TORCH_CHECK(!is_capturing(s),
              "emulated CUDA: pinned host memory allocated while the stream is capturing "
              "(cudaHostAlloc is not permitted during capture)");
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(int64_t);
  void* p = std::malloc(bytes);
  TORCH_CHECK(p != nullptr, "emulator: out of pinned memory");
  g_pinned[p] = PinnedBlock{bytes, 0, false};
  return at::from_blob(
      p, {n}, [](void* q) { pinned_free(q); }, at::TensorOptions().dtype(at::kLong));
}

int64_t g_copies = 0;  // host-to-device copies queued by the current op (host_copies)

void copy_async(const at::Tensor& dst, const at::Tensor& src, Stream* s) {
  TORCH_CHECK(dst.nbytes() == src.nbytes() && dst.is_contiguous() && src.is_contiguous(),
              "emulator: copy_async of differently sized or non-contiguous tensors");
  void* base = src.storage().data_ptr().get();
  auto it = g_pinned.find(base);
  TORCH_CHECK(it != g_pinned.end(), "emulator: copy_async from memory that is not pinned");
  ++it->second.pending;
  ++g_copies;
  void* d = dst.data_ptr();
  const void* from = src.const_data_ptr();
  const size_t n = src.nbytes();
  s->queue.push_back([d, from, n, base] {
    std::memcpy(d, from, n);
    auto block = g_pinned.find(base);
    if (--block->second.pending == 0 && block->second.freed) release_pinned(base);
  });
}

OpScope::OpScope() {
  g_op_mutex.lock();
  g_log.clear();
  g_copies = 0;
  g_allocations = 0;
  g_rng.seed(g_seed);
  {
    const std::lock_guard<std::mutex> lock(g_free_mutex);
    g_in_op = true;
  }
  g_host_allocator = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&g_device_allocator, /*priority=*/255);
}

void OpScope::finish() {
  finished_ = true;
  flush(&g_stream);
}

OpScope::~OpScope() {
  if (!finished_) {
    try {
      flush(&g_stream);  // what was launched before the host code threw still runs
    } catch (...) {
    }
  }
  g_stream.queue.clear();
  c10::SetCPUAllocator(g_host_allocator, /*priority=*/255);
  std::vector<void*> frees;
  {
    const std::lock_guard<std::mutex> lock(g_free_mutex);
    g_in_op = false;
    frees.swap(g_deferred);
  }
  for (void* p : frees) std::free(p);
  for (void* p : g_quarantine) std::free(p);
  g_quarantine.clear();
  g_op_mutex.unlock();
}

void set_schedule(Order order, uint64_t seed) {
  const std::lock_guard<std::mutex> lock(g_op_mutex);
  g_order = order;
  g_seed = seed;
}

void set_capture(bool on) {
  const std::lock_guard<std::mutex> lock(g_op_mutex);
  g_capture = on;
}

const std::vector<LaunchRecord>& launch_log() { return g_log; }
int64_t host_copies() { return g_copies; }
int64_t device_allocations() { return g_allocations; }

size_t run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body) {
  g_grid_dim = grid;
  g_block_dim = block;
  R.kernel = name;
  R.body = &body;
  R.n = block.x * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  if (g_order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_order == Order::kRandom) {
    std::shuffle(order.begin(), order.end(), g_rng);
  }
  size_t shared = 0;
  for (uint64_t b : order) {
    g_block_idx = uint3{static_cast<unsigned>(b % grid.x),
                        static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    R.shared_bytes = 0;
    run_block();
    shared = std::max(shared, R.shared_bytes);
  }
  R.body = nullptr;
  return shared;
}

// ---- called from device code -------------------------------------------------------------------

void device_fail(const std::string& what) {
  Fiber* f = R.cur;
  TORCH_INTERNAL_ASSERT(f != nullptr, "device_fail outside device code: ", what);
  R.failed = true;
  R.error = what;
  f->state = Fiber::kDone;
  yield(f, true);
  std::abort();
}

void syncthreads(const char* file, int line) {
  Fiber* f = R.cur;
  f->file = file;
  f->line = line;
  f->state = Fiber::kBarrier;
  yield(f, false);
}

void shared_var(void* p, size_t bytes) {
  for (const auto& e : R.shared) {
    if (e.first == p) return;
  }
  std::memset(p, 0xFF, bytes);
  R.shared.emplace_back(p, bytes);
  R.shared_bytes += bytes;
}

void warp_collective(unsigned mask, WarpOp op, int arg, int width, const void* in, size_t bytes,
                     void* out) {
  Fiber* f = R.cur;
  const unsigned lane = f->tid % 32, base = f->tid - lane;
  const unsigned lanes = std::min(32u, R.n - base);
  if (!((mask >> lane) & 1u)) {
    device_fail("lane " + std::to_string(lane) + " calls a warp collective with mask " +
                mask_str(mask) + ", which does not include it");
  }
  if (lanes < 32 && (mask >> lanes) != 0) {
    device_fail("warp collective mask " + mask_str(mask) + " names lanes that do not exist (the "
                "warp has " + std::to_string(lanes) + " threads)");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    device_fail("warp collective width " + std::to_string(width) + " is not a power of 2 <= 32");
  }
  f->mask = mask;
  f->op = op;
  f->arg = arg;
  f->width = width;
  f->bytes = bytes;
  if (bytes > 0) std::memcpy(f->in, in, bytes);
  f->state = Fiber::kWarp;
  yield(f, false);
  if (op == kBallot) {
    std::memcpy(out, f->out, sizeof(unsigned));
  } else if (bytes > 0) {
    std::memcpy(out, f->out, bytes);
  }
}

}  // namespace emu
}  // namespace psi
