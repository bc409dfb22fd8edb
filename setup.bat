@echo off
rem imsrc setup for Windows: creates .venv, installs imsrc, starts the embedded database, migrates.
rem   setup.bat          set up
rem   setup.bat serve    set up, then run the web page and API
rem   setup.bat test     set up, then run the test suite
setlocal
cd /d "%~dp0"
set VENV=.venv
set PY=%VENV%\Scripts\python.exe

if not exist "%PY%" (
    echo ==^> creating %VENV%
    py -3.11 -m venv %VENV% 2>nul || python -m venv %VENV% || (echo setup.bat: error: Python 3.11 or newer is needed & exit /b 1)
)
if not exist "%VENV%\.imsrc-installed" (
    echo ==^> installing imsrc and its dependencies (torch is large; the first time takes a while)
    "%PY%" -m pip install --quiet --upgrade pip || exit /b 1
    "%PY%" -m pip install --quiet -e ".[dev]" || exit /b 1
    echo installed> "%VENV%\.imsrc-installed"
)

set CMD=%1
if "%CMD%"=="" set CMD=setup
if "%CMD%"=="test" (
    "%PY%" -m pytest %2 %3 %4 %5 %6 %7 %8 %9
    exit /b %ERRORLEVEL%
)
if not exist data mkdir data
"%VENV%\Scripts\imsrc.exe" db start || exit /b 1
"%VENV%\Scripts\imsrc.exe" migrate || exit /b 1
if "%CMD%"=="serve" (
    "%VENV%\Scripts\imsrc.exe" serve %2 %3 %4 %5 %6 %7 %8 %9
    exit /b %ERRORLEVEL%
)
if "%CMD%"=="setup" (
    echo ==^> ready: setup.bat serve
    exit /b 0
)
echo setup.bat: error: unknown command '%CMD%' (use: setup.bat [serve^|test])
exit /b 1
