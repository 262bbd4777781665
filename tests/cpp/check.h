// The checks of the C++ tests: EXPECT* (c10 already defines CHECK) count passes and print
// failing values with the case under test (g_case). No framework; header-only, one test program
// per translation unit.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

namespace {

int g_passed = 0;
int g_failed = 0;
std::string g_case;  // the case under test, printed with each failure

void record(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++g_passed;
    return;
  }
  ++g_failed;
  if (g_failed <= 40) {
    std::fprintf(stderr, "FAIL %s:%d\n  case: %s\n  %s\n", file, line, g_case.c_str(),
                 what.c_str());
  } else if (g_failed == 41) {
    std::fprintf(stderr, "(further failures not printed)\n");
  }
}

std::string fmt(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

#define EXPECT(cond) record((cond), __FILE__, __LINE__, "EXPECT(" #cond ")")

#define EXPECT_NEAR(a, b, tol)                                                                   \
  do {                                                                                         \
    const double a_ = (a), b_ = (b), tol_ = (tol);                                             \
    record(std::fabs(a_ - b_) <= tol_, __FILE__, __LINE__,                                     \
           "EXPECT_NEAR(" #a ", " #b "): " + fmt(a_) + " vs " + fmt(b_) + ", diff " +           \
               fmt(std::fabs(a_ - b_)) + " > tol " + fmt(tol_));                               \
  } while (0)

}  // namespace
