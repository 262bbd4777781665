# CUDA setup for a build against torch's CMake config; call psi_cuda_enable_cuda() before
# find_package(Torch).
#
# Toolkit: torch's config finds the toolkit again with the old FindCUDA, from nvcc on PATH (a
# wrapper script in /usr/local/bin makes it look in /usr/local). It is pointed at the toolkit of
# the CUDA compiler CMake uses (CUDACXX / CMAKE_CUDA_COMPILER), unless CUDA_TOOLKIT_ROOT_DIR or
# CUDAToolkit_ROOT is given.
#
# Architectures: torch's config compiles for TORCH_CUDA_ARCH_LIST (variable or environment) by
# appending -gencode flags to CMAKE_CUDA_FLAGS, and ignores CMAKE_CUDA_ARCHITECTURES with a
# warning. Its default, "Auto", falls back without a GPU to a list starting at sm_50, which nvcc 13
# rejects. So:
#   - TORCH_CUDA_ARCH_LIST given (variable or environment): used as is;
#   - else CMAKE_CUDA_ARCHITECTURES (or CUDAARCHS) given: translated ("90" -> "9.0+PTX",
#     "90-real" -> "9.0", "90a-real" -> "9.0a", "native" -> "Auto");
#   - else the default list of setup.py, restricted to what this nvcc supports.
# CMAKE_CUDA_ARCHITECTURES is then removed so torch does not warn; targets with CUDA sources set
# their CUDA_ARCHITECTURES property to OFF.
macro(psi_cuda_enable_cuda)
  # Remember architectures given the CMake way, in the cache: a re-run of cmake (also one the
  # build triggers) must not forget them once CMAKE_CUDA_ARCHITECTURES is removed below.
  if(DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(PSI_CUDA_GIVEN_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}" CACHE INTERNAL "")
  elseif(DEFINED ENV{CUDAARCHS} AND NOT DEFINED PSI_CUDA_GIVEN_ARCHITECTURES)
    set(PSI_CUDA_GIVEN_ARCHITECTURES "$ENV{CUDAARCHS}" CACHE INTERNAL "")
  endif()

  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD ${CMAKE_CXX_STANDARD})
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  # The cudart torch uses (shared), not CMake's default static copy: one runtime in the process.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  # CMake < 3.26 does not know nvcc's -std=c++20 (nvcc >= 12 has it), which torch >= 2.10 needs.
  if(CMAKE_CUDA_STANDARD EQUAL 20 AND NOT "cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES
     AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
     AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_COMPILE_FEATURES "cuda_std_20")
    list(APPEND CMAKE_CUDA_COMPILE_FEATURES "cuda_std_20")
  endif()
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)

  if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND NOT DEFINED CUDAToolkit_ROOT
     AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
    set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit")
  endif()
  message(STATUS "psi_cuda: CUDA toolkit ${CUDA_TOOLKIT_ROOT_DIR}${CUDAToolkit_ROOT}, "
                 "nvcc ${CMAKE_CUDA_COMPILER_VERSION}")

  if(DEFINED TORCH_CUDA_ARCH_LIST OR DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    if(PSI_CUDA_GIVEN_ARCHITECTURES)
      message(STATUS "psi_cuda: TORCH_CUDA_ARCH_LIST is set; CMAKE_CUDA_ARCHITECTURES ignored")
    endif()
  elseif(PSI_CUDA_GIVEN_ARCHITECTURES)
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_arch IN LISTS PSI_CUDA_GIVEN_ARCHITECTURES)
      if(_arch STREQUAL "native")
        list(APPEND TORCH_CUDA_ARCH_LIST "Auto")
      elseif(_arch MATCHES "^([0-9]+)([0-9])([af]?)(-real|-virtual)?$")
        set(_torch_arch "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
        if(NOT CMAKE_MATCH_4 STREQUAL "-real")
          string(APPEND _torch_arch "+PTX")  # CMake's "90" and "90-virtual" both embed PTX
        endif()
        list(APPEND TORCH_CUDA_ARCH_LIST "${_torch_arch}")
      else()
        message(FATAL_ERROR "psi_cuda: cannot translate CUDA architecture '${_arch}' for torch; "
                            "set TORCH_CUDA_ARCH_LIST instead (e.g. \"8.0;9.0+PTX\")")
      endif()
    endforeach()
  elseif(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 13.0)
    set(TORCH_CUDA_ARCH_LIST "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX")
  elseif(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
    set(TORCH_CUDA_ARCH_LIST "7.0;8.0;8.6;8.9;9.0;10.0;12.0+PTX")
  else()
    set(TORCH_CUDA_ARCH_LIST "7.0;8.0;8.6;8.9;9.0+PTX")
  endif()
  if(DEFINED TORCH_CUDA_ARCH_LIST)
    message(STATUS "psi_cuda: TORCH_CUDA_ARCH_LIST = ${TORCH_CUDA_ARCH_LIST}")
  else()
    message(STATUS "psi_cuda: TORCH_CUDA_ARCH_LIST (environment) = $ENV{TORCH_CUDA_ARCH_LIST}")
  endif()
endmacro()
